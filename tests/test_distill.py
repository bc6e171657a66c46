"""The distill trainer: the divergences by hand and against TRL's GKD loss, zero loss against itself,
a tiny student learning a task from a teacher that knows it, the on-policy path, tokenizer checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from finetune.errors import RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from finetune.train.distill_losses import distill_sums, divergence
from finetune.train.losses import token_ce_sum
from tests.conftest import read_metrics, save_tiny_chat_model, write
from tests.tiny_cache import shared_tiny_model

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.2, 0.4, 0.4]  # student


def logits_of(*dists: list[float], scale: float = 1.0) -> torch.Tensor:
    return torch.tensor([[math.log(x) * scale for x in d] for d in dists])


def kl_by_hand(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


def test_forward_and_reverse_kl_by_hand():
    s, t = logits_of(Q), logits_of(P)
    assert divergence(s, t, "forward_kl").item() == pytest.approx(kl_by_hand(P, Q), rel=1e-5)
    assert divergence(s, t, "reverse_kl").item() == pytest.approx(kl_by_hand(Q, P), rel=1e-5)
    assert kl_by_hand(P, Q) != pytest.approx(kl_by_hand(Q, P), rel=1e-2)  # the two are told apart


def test_jsd_by_hand_and_its_endpoints():
    s, t = logits_of(Q), logits_of(P)
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q, strict=True)]
    expected = beta * kl_by_hand(P, m) + (1 - beta) * kl_by_hand(Q, m)
    assert divergence(s, t, "jsd", beta=beta).item() == pytest.approx(expected, rel=1e-5)
    # beta = 0 / 1 are the two KLs (as TRL), and the interior formula tends to beta x forward KL
    # and (1 - beta) x reverse KL at the two ends.
    assert divergence(s, t, "jsd", beta=0.0).item() == pytest.approx(kl_by_hand(P, Q), rel=1e-5)
    assert divergence(s, t, "jsd", beta=1.0).item() == pytest.approx(kl_by_hand(Q, P), rel=1e-5)
    eps = 1e-3
    assert divergence(s, t, "jsd", beta=eps).item() / eps == pytest.approx(kl_by_hand(P, Q), rel=1e-2)
    assert divergence(s, t, "jsd", beta=1 - eps).item() / eps == pytest.approx(kl_by_hand(Q, P), rel=1e-2)


def test_temperature_divides_both_logits():
    # Logits 2 log p at temperature 2 are the distributions p and q themselves.
    s, t = logits_of(Q, scale=2.0), logits_of(P, scale=2.0)
    for loss, expected in (("forward_kl", kl_by_hand(P, Q)), ("reverse_kl", kl_by_hand(Q, P))):
        assert divergence(s, t, loss, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)
        assert divergence(s, t, loss).item() != pytest.approx(expected, rel=1e-2)


def test_top_k_keeps_the_teachers_k_tokens_and_one_bucket_for_the_rest():
    p, q = [0.05, 0.5, 0.15, 0.3], [0.25, 0.2, 0.15, 0.4]
    s, t = logits_of(q), logits_of(p)
    # The teacher's top 2 are tokens 1 and 3; the rest bucket holds tokens 0 and 2.
    p2, q2 = [0.5, 0.3, 0.2], [0.2, 0.4, 0.4]
    assert divergence(s, t, "forward_kl", top_k=2).item() == pytest.approx(kl_by_hand(p2, q2), rel=1e-5)
    assert divergence(s, t, "reverse_kl", top_k=2).item() == pytest.approx(kl_by_hand(q2, p2), rel=1e-5)
    full = divergence(s, t, "forward_kl").item()
    # A lower bound of the full divergence, strict here: inside the rest bucket the two spread differently.
    assert divergence(s, t, "forward_kl", top_k=2).item() < full - 0.05
    assert divergence(s, t, "forward_kl", top_k=4).item() == pytest.approx(full, rel=1e-6)


def test_sums_over_trained_positions_only_and_nll_is_the_sft_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, -100, -100, 6]])
    div, nll = distill_sums(student, teacher, labels)
    # logits[:, t] predict labels[:, t + 1]: positions (0, 1), (0, 2), (1, 0), (1, 3).
    positions = [(0, 1), (0, 2), (1, 0), (1, 3)]
    expected = sum(divergence(student[r, c], teacher[r, c]).item() for r, c in positions)
    assert div.item() == pytest.approx(expected, rel=1e-5)
    assert nll.item() == pytest.approx(token_ce_sum(student, labels).item(), rel=1e-6)
    # A teacher with a vocabulary padded past the tokenizer: the extra columns are ignored.
    wide = torch.cat([teacher, torch.full((2, 5, 3), -5.0)], dim=-1)
    assert distill_sums(student, wide, labels)[0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_equals_trl_gkd_generalized_jsd_loss(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = -100
    ours, _ = distill_sums(student, teacher, labels, "jsd", beta=beta, temperature=2.0)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=beta,
                                                 temperature=2.0, num_items_in_batch=1)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# --- the trainer on a tiny task -------------------------------------------------------------------
# "What is k?" -> (7k + 3) mod 20: a lookup table a tiny random model learns by heart in 150 steps.


def task_rows(answer=lambda k: str((7 * k + 3) % 20)) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {k}?"},
                          {"role": "assistant", "content": answer(k)}]} for k in range(20)]


def tiny_recipe(tmp, model_dir, out: str, trainer: dict, steps: int, **run) -> dict:
    data = tmp / "task.jsonl"
    if not data.exists():
        write(data, "".join(json.dumps(r) + "\n" for r in task_rows()))
    return {"model": {"name": str(model_dir)}, "tokenizer": {"chat_template": "chatml", "max_length": 32},
            "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}]},
            "trainer": {"exact_match_samples": 20, "max_new_tokens": 4, **trainer},
            "optim": {"lr": 1e-2, "scheduler": "constant"},
            "run": {"output_dir": str(tmp / out), "max_steps": steps, "micro_batch_size": 10, "log_every": 10,
                    "eval_at_start": True, **run}}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(dir, the random tiny model, a teacher SFT-trained from it that answers every prompt right)."""
    tmp = tmp_path_factory.mktemp("distill")
    base = shared_tiny_model(tmp_path_factory)
    final = run_recipe(recipe_from_dict(tiny_recipe(tmp, base, "teacher", {"type": "sft"}, 150)))
    evals = [r for r in read_metrics(tmp / "teacher") if "eval_exact_match" in r]
    assert evals[-1]["eval_exact_match"] == 1.0, evals
    return tmp, base, final


def distill(tmp, base, teacher, out: str, steps: int, **cfg) -> list[dict]:
    trainer = {"type": "distill", "distill": {"teacher": str(teacher), **cfg},
               "sampling": {"max_new_tokens": 4, "temperature": 1.0}}
    run_recipe(recipe_from_dict(tiny_recipe(tmp, base, out, trainer, steps)))
    return read_metrics(tmp / out)


def test_student_learns_the_task_from_the_teacher_alone(task):
    """sft_weight 0: the data's tokens only say where to compare; what is learnt comes from the teacher."""
    tmp, base, teacher = task
    records = distill(tmp, base, teacher, "student", 100)
    evals = [r for r in records if "eval_divergence" in r]
    first, last = evals[0], evals[-1]
    assert first["eval_exact_match"] == 0.0 and last["eval_exact_match"] >= 0.7, evals
    assert last["eval_divergence"] < 0.1 * first["eval_divergence"], evals  # KL to the teacher falls
    assert all(r["loss"] == pytest.approx(r["divergence"]) for r in records if "loss" in r)  # no NLL term
    assert (tmp / "student/final/config.json").is_file()


def test_zero_loss_and_gradient_when_the_student_is_the_teacher(task):
    from transformers import AutoModelForCausalLM

    from finetune.recipe.schema import DistillCfg
    from finetune.train.collate import collate_flat
    from finetune.trainers import distill as trainer
    from finetune.trainers.sft import prepare

    tmp, base, _ = task
    prepared = prepare(recipe_from_dict(tiny_recipe(tmp, base, "x", {"type": "sft"}, 1)))
    batch = collate_flat(prepared.train_units[:6])
    student, teacher = (AutoModelForCausalLM.from_pretrained(base) for _ in range(2))
    for loss, extra in (("forward_kl", {}), ("reverse_kl", {"top_k": 3}), ("jsd", {"temperature": 2.0})):
        value, stats = trainer.DistillLoss(DistillCfg(loss=loss, **extra), teacher.eval())(student, batch)
        value.backward()
        grad = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
        assert abs(value.item()) < 1e-5 and grad < 1e-5, (loss, value.item(), grad)
        assert stats["nll"].item() > 10.0  # the random model is far from the data: not a trivial batch
        student.zero_grad()


def test_on_policy_batches_train_the_students_own_samples(task, monkeypatch):
    """lambda 1: each micro-batch's trained tokens are exactly the replies the student just sampled
    to the data's prompts (rendered as at inference), and the KL to the teacher falls on them."""
    from finetune.rl import rollout
    from finetune.trainers import distill as trainer

    tmp, base, teacher = task
    seen: list[tuple[list[int], list[int]]] = []
    real = rollout.sample_from_ids

    def spy(model, prompts, cfg, stops, pad_id):
        replies = real(model, prompts, cfg, stops, pad_id)
        seen.extend((p, r) for p, (r, _) in zip(prompts, replies, strict=True))
        return replies

    monkeypatch.setattr(trainer, "sample_from_ids", spy)
    batches = []
    real_loss = trainer.DistillLoss.__call__

    def record(self, model, batch):
        if model.training:
            batches.append(batch)
        return real_loss(self, model, batch)

    monkeypatch.setattr(trainer.DistillLoss, "__call__", record)
    records = distill(tmp, base, teacher, "on_policy", 30, loss="reverse_kl", on_policy_fraction=1.0)
    assert len(batches) == 30 and len(seen) == 300 and all(b.on_policy for b in batches)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    inference_prompts = {tuple(rollout.encode_prompt(tok, r["messages"][:-1])) for r in task_rows()}
    assert {tuple(p) for p, _ in seen} == inference_prompts
    k = 0
    for batch in batches:  # flat rows: each sample is prompt + reply, only the reply trained
        ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
        start = 0
        for n in batch.seq_lens:
            prompt, reply = seen[k]
            assert ids[start:start + n] == prompt + reply
            assert labels[start + len(prompt):start + n] == reply and set(labels[start:start + len(prompt)]) == {-100}
            start, k = start + n, k + 1
    train = [r for r in records if "loss" in r]
    assert all(r["on_policy"] == 1.0 for r in train)
    assert train[-1]["divergence"] < 0.85 * train[0]["divergence"], train  # measured 7.5 -> 5.5
    evals = [r for r in records if "eval_divergence" in r]
    assert evals[-1]["eval_divergence"] < 0.6 * evals[0]["eval_divergence"], evals  # measured 8.8 -> 4.1


def test_on_policy_fraction_picks_that_share_of_batches(task, monkeypatch):
    from finetune.trainers import distill as trainer
    from finetune.trainers.sft import prepare

    tmp, base, teacher = task
    monkeypatch.setattr(trainer, "sample_from_ids", lambda model, prompts, *a: [([5, 6], True) for _ in prompts])
    data = tiny_recipe(tmp, base, "x", {"type": "distill", "distill": {"teacher": str(teacher),
                                                                        "on_policy_fraction": 0.25}}, 1)
    recipe = recipe_from_dict(data)
    prepared = prepare(recipe)
    collate = trainer.DistillCollate(recipe, None, prepared.tokenizer)
    torch.manual_seed(0)
    flags = [collate(prepared.train_units[:2]).on_policy for _ in range(400)]
    assert 0.19 < sum(flags) / len(flags) < 0.31
    batch = collate(prepared.train_units[:2])
    while not batch.on_policy:
        batch = collate(prepared.train_units[:2])
    assert batch.num_trained_tokens == 4  # two samples, each trained on its 2 sampled tokens only


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(task, tmp_path, capsys):
    from finetune.cli.main import main

    tmp, base, _ = task
    other = save_tiny_chat_model(tmp_path / "other", texts=[f"{a} times {b} is {a * b}" for a in range(30)
                                                            for b in range(30)])
    data = tiny_recipe(tmp, base, "refused", {"type": "distill", "distill": {"teacher": str(other)}}, 1)
    with pytest.raises(RecipeError, match=r"^trainer\.distill\.teacher: .* another tokenizer than the student"):
        run_recipe(recipe_from_dict(data))
    path = write(tmp_path / "r.yaml", yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer.distill.teacher" in err, err
    assert not (tmp / "refused").exists()  # nothing written
    data["trainer"]["distill"] = {"teacher": str(write(tmp_path / "lora/adapter_config.json", "{}").parent)}
    with pytest.raises(RecipeError, match=r"^trainer\.distill\.teacher: .* is a LoRA adapter; merge it"):
        run_recipe(recipe_from_dict(data))
    data["trainer"]["distill"] = {}
    assert main(["validate", str(write(tmp_path / "r.yaml", yaml.safe_dump(data)))]) == 2
    assert "trainer.distill.teacher: distill needs a teacher" in capsys.readouterr().err


def test_sft_weight_adds_the_nll_on_data_batches_only(task):
    from transformers import AutoModelForCausalLM

    from finetune.recipe.schema import DistillCfg
    from finetune.train.collate import collate_flat
    from finetune.trainers import distill as trainer
    from finetune.trainers.sft import prepare

    tmp, base, teacher_dir = task
    prepared = prepare(recipe_from_dict(tiny_recipe(tmp, base, "x", {"type": "sft"}, 1)))
    flat = collate_flat(prepared.train_units[:4])
    student, teacher = AutoModelForCausalLM.from_pretrained(base), AutoModelForCausalLM.from_pretrained(teacher_dir)
    loss = trainer.DistillLoss(DistillCfg(sft_weight=0.5, on_policy_fraction=0.5), teacher.eval())
    for on_policy in (False, True):
        batch = trainer.DistillBatch(**{k: getattr(flat, k) for k in flat.__dataclass_fields__}, on_policy=on_policy)
        value, stats = loss(student, batch)
        nll = 0.0 if on_policy else 0.5 * stats["nll"].item()
        assert value.item() == pytest.approx(stats["divergence"].item() + nll, rel=1e-6)
        assert stats["on_policy"].item() == (batch.num_trained_tokens if on_policy else 0)


def test_the_teacher_can_be_an_earlier_pipeline_stage_and_finetune_data_audits_distill(task, tmp_path):
    from finetune.cli.main import main
    from finetune.run.pipeline import load_pipeline

    tmp, base, teacher = task
    student = tiny_recipe(tmp, base, "s", {"type": "distill", "distill": {"teacher": str(teacher)}}, 1)
    write(tmp_path / "distill.yaml", yaml.safe_dump(student))
    write(tmp_path / "sft.yaml", yaml.safe_dump(tiny_recipe(tmp, base, "t", {"type": "sft"}, 1)))
    pipe = {"pipeline": {"output_dir": str(tmp_path / "story")},
            "stages": [{"name": "big", "recipe": "sft.yaml"},
                       {"name": "small", "recipe": "distill.yaml",
                        "overrides": {"trainer.distill.teacher": "stage:big"}}]}
    _, stages = load_pipeline(write(tmp_path / "pipe.yaml", yaml.safe_dump(pipe)))
    assert stages[1][1].trainer.distill.teacher == str(tmp_path / "story/big/final")
    assert main(["data", str(tmp_path / "distill.yaml")]) == 0


def test_on_policy_needs_a_strategy_where_every_rank_holds_the_whole_student(tmp_path):
    from finetune.run.launch import check_strategy

    data = tiny_recipe(tmp_path, tmp_path, "x", {"type": "distill", "distill": {"teacher": "t"}}, 1)
    data["launch"] = {"strategy": "fsdp"}
    check_strategy(recipe_from_dict(data))  # off-policy: any strategy
    data["trainer"]["distill"]["on_policy_fraction"] = 0.5
    with pytest.raises(RecipeError, match="launch.strategy: distill runs under ddp or zero2"):
        check_strategy(recipe_from_dict(data))
