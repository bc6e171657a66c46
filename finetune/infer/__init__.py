"""Using a trained model: load it as saved, generate, chat, evaluate, plot runs."""
