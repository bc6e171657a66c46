"""PPO's model modes, precision and reference, on models built the way a recipe builds them.

`from_pretrained` returns a model in eval mode, and that is where these bugs hide: a toy model
built with its constructor starts in train mode. So every test here loads a saved tiny Llama
through the trainer's own `prepare` + `_build`, then drives `PPO.step` / `rollout` / `learn`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import finetune.trainers.ppo as ppo_module
from finetune.recipe.schema import recipe_from_dict
from finetune.rl.ppo_setup import ChatScorer, evaluate, prepare
from finetune.train.engine import release_accelerator
from tests.conftest import ROOT, TINY_LLAMA


@pytest.fixture(autouse=True)
def _one_thread_fresh_accelerator():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small are all per-op overhead
    yield
    torch.set_num_threads(threads)
    release_accelerator()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved like a Hub model whose tokenizer has no pad token: the run adds one and
    resizes the embeddings, so the model has rows drawn at load time (as with most base models)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.data.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("model") / "tiny-no-pad"
    texts = [f"What is {a} + {b}? {a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    tok = train_bpe_tokenizer(texts, vocab_size=320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                              chat_template="chatml", pad_token="<|endoftext|>")
    tok.pad_token = None
    assert "<|pad|>" not in tok.get_vocab()
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        cfg.pop("model_type"), vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe(tmp, model_dir, adapter: bool = False, from_scratch: bool = False, **run):
    model = {"init_config": dict(TINY_LLAMA)} if from_scratch else {"name": str(model_dir)}
    data = {
        "model": {**model, "gradient_checkpointing": True},
        "tokenizer": {"chat_template": "chatml", "max_length": 64, "name": str(model_dir)},
        "data": {"train": [{"path": str(ROOT / "data/quickstart/prompts_train.jsonl"), "format": "prompts",
                            "max_samples": 8}],
                 "eval": [{"path": str(ROOT / "data/quickstart/prompts_eval.jsonl"), "format": "prompts",
                           "max_samples": 2}]},
        "trainer": {"type": "ppo", "sampling": {"n": 1, "max_new_tokens": 5},
                    "rewards": [{"type": "length", "max_length": 8}],
                    "ppo": {"rollout_batch_size": 8, "epochs": 2, "minibatches": 2}},
        "optim": {"lr": 1e-3},
        "run": {"output_dir": str(tmp / "ppo"), "max_steps": 1, "micro_batch_size": 2, **run},
    }
    if adapter:
        data["adapter"] = {"r": 4, "alpha": 8}
    return recipe_from_dict(data)


def build(r, mixed_precision: str = "no", cpu: bool = True):
    """The trainer's own construction (`train` minus the loop): models loaded with from_pretrained."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    p = prepare(r)
    ppo, stream, _ = ppo_module._build(r, p, accelerator)
    return ppo, p, stream


def update_batch(p, stream):
    rows = stream.indices(0)
    return [p.prompt_ids[i] for i in rows], ChatScorer(p, [p.prompts[i] for i in rows])


def first_mlps(ppo) -> dict:
    """The MLP of layer 0 of the policy and of a separate critic. Inside the layer, not the layer:
    transformers checkpoints a layer's forward, so only its submodules' hooks see the recomputation."""
    policy, critic = ppo.unwrapped.policy, ppo.unwrapped.critic
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    layers = {"policy": base.model.layers[0].mlp}
    if hasattr(critic, "body"):
        layers["critic"] = critic.body.layers[0].mlp
    return layers


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_rollouts_run_in_eval_mode_and_updates_in_train_mode_with_checkpointing(in_tmp, model_dir, adapter):
    ppo, p, stream = build(recipe(in_tmp, model_dir, adapter=adapter))
    seen = {name: [] for name in first_mlps(ppo)}
    for name, layer in first_mlps(ppo).items():
        # grad enabled: the update's forward, or its recomputation during backward (checkpointing)
        layer.register_forward_pre_hook(lambda m, a, name=name: seen[name].append((torch.is_grad_enabled(),
                                                                                      m.training)))
    prompts, scorer = update_batch(p, stream)
    ppo.step(prompts, scorer)
    cfg, micro = ppo.cfg, ppo.micro
    update_forwards = cfg.epochs * cfg.rollout_batch_size // micro  # micro-batch forwards of the update
    for name, calls in seen.items():
        rollout = [training for grad, training in calls if not grad]
        update = [training for grad, training in calls if grad]
        assert rollout and not any(rollout), f"{name}: sampling and scoring must run in eval mode"
        assert update and all(update), f"{name}: the update's forwards must run in train mode"
        # Activation checkpointing is on (transformers checkpoints only in train mode): every layer
        # runs once forward and once more during backward.
        assert len(update) == 2 * update_forwards, name
    assert ppo.reference is None or not any(m.training for m in ppo.reference.modules())


def test_bf16_rollouts_and_held_out_generation_sample_under_the_scoring_autocast(in_tmp, model_dir, monkeypatch):
    r = recipe(in_tmp, model_dir)
    ppo, p, stream = build(r, mixed_precision="bf16")
    phase, dtypes = ["other"], {}
    head = ppo.unwrapped.policy.lm_head
    head.register_forward_hook(lambda m, a, out: dtypes.setdefault(phase[0], set()).add(out.dtype))

    def tagged(fn, name):
        def call(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "other"
        return call

    import finetune.rl.ppo_models as ppo_models

    monkeypatch.setattr(ppo_module, "generate", tagged(ppo_module.generate, "rollout"))
    monkeypatch.setattr(ppo_models, "generate", tagged(ppo_models.generate, "held_out"))
    monkeypatch.setattr(ppo, "_score_tokens", tagged(ppo._score_tokens, "scoring"))
    prompts, scorer = update_batch(p, stream)
    ppo.rollout(prompts, scorer)
    evaluate(ppo.unwrapped.policy, p, r, None, ppo.acc)
    assert head.weight.dtype == torch.float32  # fp32 master weights: only autocast makes bf16 logits
    assert dtypes["scoring"] == {torch.bfloat16}
    assert dtypes["rollout"] == dtypes["scoring"], "samples must come from the distribution that is scored"
    assert dtypes["held_out"] == dtypes["scoring"]


@pytest.mark.parametrize("source", ["saved", "init_config"])
def test_full_weight_reference_equals_the_initial_policy(in_tmp, model_dir, monkeypatch, source):
    """From a saved model whose tokenizer gains a pad token (rows drawn at load), and from scratch
    (every weight drawn at load): KL exactly 0 and ratio exactly 1 before the first step."""
    ratios, real = [], ppo_module.clipped_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, clip=0.2):
        ratios.append((torch.exp(logprobs - old_logprobs).detach(), mask.bool()))
        return real(logprobs, old_logprobs, advantages, mask, clip)

    monkeypatch.setattr(ppo_module, "clipped_policy_loss", spy)
    ppo, p, stream = build(recipe(in_tmp, model_dir, from_scratch=source == "init_config"))
    if source == "saved":
        saved_rows = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"].shape[0]
        assert ppo.unwrapped.policy.get_input_embeddings().weight.shape[0] == len(p.tokenizer) > saved_rows
    for (name, a), b in zip(ppo.unwrapped.policy.state_dict().items(), ppo.reference.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    exp, stats = ppo.rollout(*update_batch(p, stream))
    assert torch.equal(exp.logprobs, exp.ref_logprobs)
    assert exp.kl.abs().max().item() == 0.0
    ppo.learn(exp, stats)
    accumulation = ppo.cfg.rollout_batch_size // ppo.cfg.minibatches // ppo.micro
    for ratio, mask in ratios[:accumulation]:  # the first minibatch: before any optimizer step
        assert torch.equal(ratio[mask], torch.ones_like(ratio[mask]))


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "cpu"])
def test_every_trainer_runs_with_tf32_matmuls_on_cuda(in_tmp, model_dir, monkeypatch, restore_matmul_precision,
                                                      cuda):
    import types

    import finetune.trainers as trainers
    from finetune.run.launch import run_recipe

    torch.set_float32_matmul_precision("highest")
    seen = []

    def train(recipe, resume_from=None, num_processes=1):
        seen.append(torch.get_float32_matmul_precision())
        return in_tmp

    # run_recipe is the one way into every trainer; CUDA is faked only around it.
    monkeypatch.setattr(trainers, "get_trainer", lambda name: types.SimpleNamespace(train=train))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    run_recipe(recipe(in_tmp, model_dir))
    assert seen == ["high" if cuda else "highest"]


# ---------------------------------------------------------------- GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_matmuls_use_tf32_on_gpu(restore_matmul_precision):
    """What the CPU test cannot show: the setting reaches cuBLAS (TF32 rounds inputs to 10 mantissa bits)."""
    from finetune.run.launch import enable_tf32

    a, b = (torch.randn(512, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(i)) for i in (0, 1))
    exact = (a.double() @ b.double()).float()
    torch.set_float32_matmul_precision("highest")
    ieee_error = ((a @ b) - exact).abs().max().item()
    enable_tf32()
    tf32_error = ((a @ b) - exact).abs().max().item()
    assert tf32_error > 10 * ieee_error, (tf32_error, ieee_error)


def bf16_update_checks(tmp, model_dir, monkeypatch, cpu: bool) -> None:
    """One update of a full-weight policy (fp32 master weights, checkpointing) under bf16 autocast:
    bf16 sampling and scoring, KL 0 before the first step, ratio ~1 in the first minibatch, critic
    modes by phase, a finite non-zero gradient."""
    ratios, real = [], ppo_module.clipped_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, clip=0.2):
        ratios.append((torch.exp(logprobs - old_logprobs).detach(), mask.bool()))
        return real(logprobs, old_logprobs, advantages, mask, clip)

    monkeypatch.setattr(ppo_module, "clipped_policy_loss", spy)
    ppo, p, stream = build(recipe(tmp, model_dir), mixed_precision="bf16", cpu=cpu)
    dtypes, modes = [], []
    ppo.unwrapped.policy.lm_head.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    first_mlps(ppo)["critic"].register_forward_pre_hook(lambda m, a: modes.append((torch.is_grad_enabled(),
                                                                                   m.training)))
    exp, stats = ppo.rollout(*update_batch(p, stream))
    assert set(dtypes) == {torch.bfloat16}  # sampling and scoring
    assert exp.kl.abs().max().item() <= 1e-6  # fresh token rows differ by ~1e-4
    ppo.learn(exp, stats)
    assert modes and all(training == grad for grad, training in modes)
    ratio, mask = ratios[0]
    # The same bf16 maths, once without and once with autograd (the attention kernel may differ).
    assert (ratio[mask] - 1).abs().max().item() < 1e-2
    assert 0 < stats.means(None)["grad_norm"] < float("inf")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_weight_ppo_update_on_gpu_in_bf16(in_tmp, model_dir, monkeypatch):
    bf16_update_checks(in_tmp, model_dir, monkeypatch, cpu=False)
