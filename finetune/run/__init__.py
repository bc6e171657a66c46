"""Running recipes: output-dir checks and resume (launch), multi-process launch, pipelines, data audit, env doctor."""
