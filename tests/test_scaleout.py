"""Multi-GPU set-up that a CPU can check: generated launch configs, the DeepSpeed branch of the
loop, even eval across ranks, trainer + strategy refusals, and the device set before loading."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import accelerate_config, deepspeed_config
from tests.conftest import TINY_LLAMA, tiny_pretrain_recipe

TINY = {
    "llama": dict(TINY_LLAMA),
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 64},
    "gemma3": {"model_type": "gemma3",
               "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
               "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "image_size": 32, "patch_size": 16}},
}


def recipe(tmp, init_config=None, **launch):
    data = tiny_pretrain_recipe(tmp)
    if init_config is not None:
        data["model"]["init_config"] = init_config
    data["launch"] = launch
    return recipe_from_dict(data)


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama", ["LlamaDecoderLayer"]),
    ("gpt2", ["GPT2Block"]),
    ("gpt_neox", ["GPTNeoXLayer"]),
    # Gemma-3 is a vision + text wrapper: both towers' blocks (and the units SigLIP declares),
    # never the old rename's "Gemma3ForConditionalGenerationDecoderLayer"
    ("gemma3", ["Gemma3DecoderLayer", "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead",
                "SiglipVisionEmbeddings"]),
])
def test_fsdp_wraps_the_models_own_block_classes(in_tmp, model_type, expected):
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import load_config
    from finetune.train.sharding import block_classes

    r = recipe(in_tmp, TINY[model_type], strategy="fsdp")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(r))
    assert block_classes(model) == set(expected)
    # the engine shards (finetune/train/sharding.py); accelerate only starts the processes, as for ddp
    assert accelerate_config(r) == accelerate_config(recipe(in_tmp, TINY[model_type]))


def test_fsdp_state_dict_is_noted_as_unused(in_tmp):
    from finetune.recipe.checks import check_recipe

    assert not any("fsdp_state_dict" in n for n in check_recipe(recipe(in_tmp, strategy="fsdp")))
    notes = check_recipe(recipe(in_tmp, strategy="fsdp", fsdp_state_dict="sharded"))
    assert any(n.startswith("launch.fsdp_state_dict is no longer used") for n in notes)


@pytest.mark.parametrize(("strategy", "precision"), [("zero2", "bf16"), ("zero3", "fp16"), ("zero3", "fp32")])
def test_deepspeed_config_states_every_batch_key(in_tmp, strategy, precision):
    r = recipe(in_tmp, strategy=strategy)
    r.run.precision, r.run.micro_batch_size, r.run.grad_accum, r.optim.max_grad_norm = precision, 3, 5, 0.5
    ds = deepspeed_config(r)
    # accelerate's prepare() raises on an "auto" micro batch when no DataLoader is passed (ours are not)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["zero_optimization"]["stage"] == int(strategy[-1])
    assert not any(v == "auto" for v in json.dumps(ds).split('"'))
    cfg = accelerate_config(r, in_tmp / "ds.json")
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert cfg["deepspeed_config"] == {"deepspeed_config_file": str(in_tmp / "ds.json"), "zero3_init_flag": False,
                                       "deepspeed_multinode_launcher": "standard"}
    # accelerate refuses a mixed_precision key next to a DeepSpeed file (the file decides precision)
    assert "mixed_precision" not in cfg
    yaml.safe_dump(cfg)


class DeepSpeedLike:
    """accelerate's DeepSpeed path as the loop sees it, with the engine's two rules: a backward
    divides the loss by gradient_accumulation_steps unless told not to, and the backward of a
    micro-batch with sync_gradients set runs the optimizer step (DeepSpeedEngineWrapper.backward)."""

    def __init__(self, gas: int) -> None:
        from accelerate.state import GradientState
        from accelerate.utils import DistributedType

        self.distributed_type, self.num_processes, self.gas = DistributedType.DEEPSPEED, 1, gas
        self.gradient_state = GradientState()
        self.engine_steps: list[int] = []
        self.backwards = 0

    def no_sync(self, model):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss, scale_wrt_gas: bool = True):
        self.backwards += 1
        (loss / self.gas if scale_wrt_gas else loss).backward()
        if self.gradient_state.sync_gradients:
            self.engine_steps.append(self.backwards)


def test_deepspeed_engine_steps_once_per_optimizer_step_on_the_step_mean():
    from finetune.train import engine
    from finetune.train.collate import collate_padded
    from tests.test_engine import grads_after, samples_of_different_lengths, tiny_model

    model = tiny_model()
    acc = DeepSpeedLike(gas=4)
    task = engine.SupervisedTask(model=model, tokenizer=None, train_units=[],
                                 collate=lambda s: collate_padded(s, pad_id=0))
    micro = [task.collate([s]) for s in samples_of_different_lengths()]
    engine.accumulate_gradients(acc, model, task, micro)
    assert acc.engine_steps == [4]  # the boundary is the last micro-batch, not every one
    assert acc.gradient_state.sync_gradients  # restored for whatever runs next
    plain = grads_after([1, 1, 1, 1])  # the same step without DeepSpeed (torch's own accumulation)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5)


def test_numeric_guard_takes_deepspeeds_float_grad_norm():
    from finetune.train.guards import NumericGuard

    guard = NumericGuard(max_consecutive=3, fp16=False)
    assert guard.step_is_finite(0.7) and guard.step_is_finite(torch.tensor(0.7))
    assert not guard.step_is_finite(float("inf")) and not guard.step_is_finite(float("nan"))
    assert guard.consecutive == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ZeRO-2 on one CUDA GPU (tests/test_deepspeed.py runs "
                    "CPU processes)")
def test_zero2_with_accumulation_equals_one_plain_process(in_tmp, tmp_path_factory):
    """One GPU under ZeRO-2 (micro 4 x accumulation 2, fp32) ends with the weights of the plain
    run: the engine accumulates both micro-batches on the step mean and steps once per step."""
    pytest.importorskip("deepspeed")
    from finetune.run.launch import run_recipe
    from tests.conftest import save_tiny_chat_model, tiny_sft_recipe
    from tests.test_launch import assert_same_weights, free_port, launch

    model_dir = save_tiny_chat_model(tmp_path_factory.mktemp("model") / "tiny")

    def sft(name):
        data = tiny_sft_recipe(in_tmp, model_dir, max_steps=3, micro_batch_size=4, grad_accum=2,
                               precision="fp32", save_every=None)
        data["run"]["output_dir"] = str(in_tmp / name)
        return data

    run_recipe(recipe_from_dict(sft("plain")))
    proc = launch(in_tmp, sft("zero2"), "--gpus", "1", "--strategy", "zero2", "--master", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(deepspeed," in proc.stderr
    ds = json.loads((in_tmp / "zero2" / "deepspeed_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert_same_weights(in_tmp / "plain", in_tmp / "zero2")


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("trainer", ["pretrain", "sft", "reward"])
def test_each_rank_sets_its_device_before_loading_weights(in_tmp, tmp_path_factory, monkeypatch, trainer):
    """PartialState (which sets cuda:LOCAL_RANK) exists when the trainer loads its model; before,
    sft/pretrain/reward loaded first and every rank's QLoRA probe and context went to GPU 0."""
    from accelerate.state import AcceleratorState, PartialState

    from finetune.models import loading, reward_model
    from finetune.trainers import get_trainer
    from tests.conftest import tiny_sft_recipe
    from tests.test_reward_trainer import reward_recipe
    from tests.tiny_cache import shared_tiny_model

    seen = []

    def load(*args, **kwargs):
        seen.append(PartialState._shared_state != {})
        raise _Loaded

    monkeypatch.setattr(loading, "load_model", load)
    monkeypatch.setattr(reward_model, "load_reward_model", load)
    if trainer == "pretrain":
        data = tiny_pretrain_recipe(in_tmp)
    else:
        model_dir = shared_tiny_model(tmp_path_factory)
        data = tiny_sft_recipe(in_tmp, model_dir) if trainer == "sft" else reward_recipe(in_tmp, model_dir)
    AcceleratorState._reset_state(reset_partial_state=True)  # as in a fresh process
    with pytest.raises(_Loaded):
        get_trainer(trainer).train(recipe_from_dict(data))
    assert seen == [True]


def test_quantization_probe_runs_on_the_ranks_gpu(monkeypatch):
    from finetune.models import loading

    pytest.importorskip("bitsandbytes")  # imported before CUDA is faked: its CUDA backend would load
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert loading.rank_device() == "cuda:3"
    monkeypatch.setenv("LOCAL_RANK", "5")  # more processes than GPUs on a node: wrap, as accelerate does
    assert loading.rank_device() == "cuda:1"
    probed = []
    monkeypatch.setattr(loading, "_bnb_probe", lambda q, device, compute: probed.append(device))
    monkeypatch.setattr(loading, "quant_compute_dtype", lambda recipe: torch.bfloat16)
    r = recipe_from_dict({"model": {"name": "some/model", "quantize": "4bit"}, "adapter": {"type": "lora"},
                          "data": {"train": [{"path": "x.jsonl", "format": "messages"}]},
                          "trainer": {"type": "sft"}, "run": {"output_dir": "out"}})
    monkeypatch.setenv("LOCAL_RANK", "2")
    loading.check_quantization_supported(r)
    assert probed == ["cuda:2"]
    assert loading.quantization_kwargs(r)["device_map"] == {"": "cuda:2"}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_eval_batches_are_even_across_ranks_and_cover_every_unit_once(world, micro):
    from finetune.train.engine import eval_batches

    for n in range(1, 23):
        per_rank = [eval_batches(n, micro, world, r) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1, (n, [len(b) for b in per_rank])  # same forward count
        assert sorted(i for b in per_rank for batch in b for i in batch) == list(range(n))
        assert all(len(batch) <= micro for b in per_rank for batch in b)
        capped = [eval_batches(n, micro, world, r, limit=2) for r in range(world)]
        assert {len(b) for b in capped} == {min(2, len(per_rank[0]))}
    assert eval_batches(5, 2, 1, 0) == [[0, 1], [2, 3], [4]]  # one process: consecutive micro-batches


class RankOf:
    """One rank of a world as evaluate() sees it; reduce() hands back the local sum (the test adds
    the ranks' sums itself), so every rank can run in this one process."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.sums: list[float] = []

    def reduce(self, t, reduction):
        self.sums.append(float(t))
        return t

    def unwrap_model(self, model):
        return model


def test_eval_runs_the_same_forwards_on_every_rank_and_equals_one_process(in_tmp):
    from finetune.train import engine
    from finetune.train.collate import collate_padded
    from tests.test_engine import samples_of_different_lengths, tiny_model

    model = tiny_model()
    calls = []

    def loss_sum(m, batch):
        calls.append(batch.input_ids.shape[0])
        return engine.causal_lm_loss_sum(m, batch)

    units = samples_of_different_lengths() + samples_of_different_lengths()[:1]  # 5 units
    task = engine.SupervisedTask(model=model, tokenizer=None, train_units=[], eval_units=units,
                                 collate=lambda s: collate_padded(s, pad_id=0), loss_sum=loss_sum)
    r = recipe_from_dict(tiny_pretrain_recipe(in_tmp, micro_batch_size=2))
    one = engine.evaluate(r, task, model, RankOf(0, 1))["eval_loss"]
    forwards, loss, tokens = [], 0.0, 0.0
    for rank in range(2):
        calls.clear()
        acc = RankOf(rank, 2)
        engine.evaluate(r, task, model, acc)
        forwards.append(len(calls))
        loss, tokens = loss + acc.sums[0], tokens + acc.sums[1]
    assert forwards == [2, 2]  # rank 1 has 2 units, rank 0 has 3: one stand-in forward evens them
    assert loss / tokens == pytest.approx(one, rel=1e-9)


@pytest.mark.parametrize(("trainer", "strategy"), [("rs_sft", "fsdp"), ("rs_sft", "zero3"), ("ppo", "zero2")])
def test_trainers_that_sample_refuse_sharded_strategies_before_loading(in_tmp, capsys, monkeypatch, trainer,
                                                                       strategy, tmp_path_factory):
    from finetune.cli.main import main
    from finetune.models import loading
    from tests.conftest import write
    from tests.tiny_cache import shared_tiny_model

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    data = tiny_pretrain_recipe(in_tmp)
    data["model"] = {"name": str(shared_tiny_model(tmp_path_factory))}
    data["tokenizer"] = {"chat_template": "chatml", "max_length": 128}
    data["trainer"] = {"type": trainer, "rewards": [{"type": "numeric"}]}
    write(in_tmp / "prompts.jsonl", "".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                                            for a in range(8)))
    data["data"]["train"] = [{"path": "prompts.jsonl", "format": "prompts"}]
    data["launch"] = {"strategy": strategy}
    path = write(in_tmp / "r.yaml", json.dumps(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"launch.strategy: {trainer} runs under ddp" in err and strategy in err and "Traceback" not in err
    assert not (in_tmp / "out").exists()
    # the same pair set by a cluster's own `accelerate launch` (environment only) is refused too
    data["launch"] = {}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    path = write(in_tmp / "r.yaml", json.dumps(data))
    assert main(["run", str(path)]) == 2
    assert "fsdp shards" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs two GPUs (CPU: tests/test_fsdp.py)")
def test_fsdp_run_with_eval_and_samples_equals_one_plain_process(in_tmp, tmp_path_factory):
    """FSDP2 on 2 GPUs (NCCL; one process alone is not sharded): eval with uneven shares and the
    sample prompts (every forward all-gathers; they used to hang on 2 GPUs) finish, and weights
    and eval loss equal one plain process."""
    from finetune.run.launch import run_recipe
    from tests.conftest import tiny_sft_recipe
    from tests.test_launch import assert_same_weights, free_port, launch
    from tests.tiny_cache import shared_tiny_model

    model_dir = shared_tiny_model(tmp_path_factory)
    gpus = min(2, torch.cuda.device_count())

    def sft(name, micro):
        data = tiny_sft_recipe(in_tmp, model_dir, max_steps=2, micro_batch_size=micro, eval_at_start=True,
                               precision="fp32", save_every=None, sample_prompts=["What is 2 + 3?"])
        data["data"]["eval"][0]["max_samples"] = 5
        data["run"]["output_dir"] = str(in_tmp / name)
        return data

    def eval_losses(name):
        rows = [json.loads(x) for x in (in_tmp / name / "metrics.jsonl").read_text().splitlines()]
        return [r["eval_loss"] for r in rows if "eval_loss" in r]

    run_recipe(recipe_from_dict(sft("one", 4)))
    proc = launch(in_tmp, sft("fsdp", 4 // gpus), "--gpus", str(gpus), "--strategy", "fsdp",
                  "--master", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(fsdp," in proc.stderr and "'What is 2 + 3?' ->" in proc.stderr
    assert "fsdp_config" not in yaml.safe_load((in_tmp / "fsdp" / "accelerate_config.yaml").read_text())
    assert eval_losses("fsdp") == pytest.approx(eval_losses("one"), rel=1e-4)
    assert_same_weights(in_tmp / "one", in_tmp / "fsdp")
