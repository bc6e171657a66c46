"""Critic-free RL in the PPO trainer (trainer.ppo.advantage: grpo | rloo): group advantages by hand,
the loss normalisations, the KL loss term, no critic, and the toy tasks of test_ppo.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

import finetune.trainers.ppo as ppo_module
from finetune.errors import RecipeError
from finetune.recipe.schema import PPOCfg, SamplingCfg, recipe_from_dict
from finetune.rl.ppo_models import ActorCritic, disable_dropout
from finetune.run.launch import run_recipe
from finetune.train.engine import release_accelerator
from finetune.train.losses import group_advantages, kl_penalty, masked_sum, token_weights
from finetune.trainers.ppo import PPO
from tests.conftest import save_tiny_chat_model
from tests.test_ppo import copy_reward, gpt2_config, ppo_recipe, prompts, records, target_reward


@pytest.fixture(autouse=True)
def _fresh_accelerator_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    release_accelerator()


def toy_group_rl(advantage: str = "grpo", n: int = 4, seed: int = 0, lr: float = 3e-4, micro: int = 16,
                 **cfg) -> PPO:
    """test_ppo.toy_ppo without a critic: the GPT-2 policy and its frozen reference copy."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(gpt2_config())
    reference = copy.deepcopy(policy).requires_grad_(False)
    for m in (policy, reference):
        disable_dropout(m)
    model = ActorCritic(policy, None)
    sampling = SamplingCfg(n=n, temperature=1.0, max_new_tokens=cfg.pop("max_new_tokens", 8))
    stop_ids = cfg.pop("stop_ids", ())
    ppo_cfg = PPOCfg(**{"kl_coef": 0.01, "missing_eos_penalty": None, "advantage": advantage, **cfg})
    return PPO(model, torch.optim.Adam(model.parameters(), lr=lr, eps=1e-5), ppo_cfg, sampling,
               accelerator=Accelerator(cpu=True), micro_batch_size=micro, reference=reference, seed=seed,
               stop_ids=stop_ids)


def grouped(g: torch.Generator, n: int, rows: int = 64, **kw) -> list[list[int]]:
    """rows / n prompts, each repeated n times in a row (as train() lays out a rollout)."""
    return [p for p in prompts(g, rows=rows // n, **kw) for _ in range(n)]


def train_groups(ppo: PPO, reward, updates: int, seed: int = 0, **kw) -> list[float]:
    g = torch.Generator().manual_seed(seed + 1)
    return [ppo.step(grouped(g, ppo.sampling.n, **kw), reward)[0]["score"] for _ in range(updates)]


# ---------------------------------------------------------------- the maths, by hand


def test_group_advantages_by_hand():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt((2**2 + 0 + 1 + 1) / 3)  # group 1: mean 1, unbiased std sqrt(2)
    grpo = group_advantages(r, 4, "grpo")
    assert grpo.tolist() == pytest.approx([2 / (std + 1e-4), 0.0, -1 / (std + 1e-4), -1 / (std + 1e-4), 0, 0, 0, 0])
    assert group_advantages(r, 4, "grpo", std=False).tolist() == pytest.approx([2, 0, -1, -1, 0, 0, 0, 0])
    # RLOO: each reward minus the mean of the other three of its prompt.
    assert group_advantages(r, 4, "rloo").tolist() == pytest.approx([3 - 1 / 3, 1 - 1, 0 - 4 / 3, 0 - 4 / 3,
                                                                     0, 0, 0, 0])
    assert group_advantages(r, 2, "rloo").tolist() == pytest.approx([2, -2, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3, "grpo")


def test_token_weights_give_each_normalisation_computed_directly():
    lengths, width = [5, 1, 3, 7], 8
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    tokens = float(sum(lengths))

    def loss(norm):
        return (masked_sum(x * token_weights(mask, norm, tokens, 4, width), mask) / tokens).item()

    row_means = [x[i, :n].mean().item() for i, n in enumerate(lengths)]
    assert loss("token_mean") == pytest.approx(masked_sum(x, mask).item() / tokens, rel=1e-6)
    assert loss("seq_mean") == pytest.approx(sum(row_means) / 4, rel=1e-6)
    assert loss("constant") == pytest.approx(masked_sum(x, mask).item() / (4 * width), rel=1e-6)


# ---------------------------------------------------------------- the rollout and the update


@pytest.mark.parametrize(("advantage", "std", "kl_in"), [("grpo", True, "auto"), ("grpo", False, "reward"),
                                                        ("rloo", True, "auto")])
def test_rollout_advantages_are_the_group_formula_on_every_token(advantage, std, kl_in):
    ppo = toy_group_rl(advantage, grpo_std=std, kl_in=kl_in, kl_coef=0.5, stop_ids=[5, 7], max_new_tokens=6)
    with torch.no_grad():  # a reference away from the policy: the KL is not 0
        for p in ppo.reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    exp, _ = ppo.rollout(grouped(torch.Generator().manual_seed(0), 4, rows=16), lambda p, r: [len(x) % 3 for x in r])
    kl_seq = masked_sum(exp.logprobs - exp.ref_logprobs, exp.mask, dim=1)  # k1 (the default estimator)
    in_reward = kl_in == "reward" or (kl_in == "auto" and advantage == "rloo")
    seq = exp.raw_scores - (0.5 * kl_seq if in_reward else 0.0)
    assert kl_seq.abs().max() > 0.1 and len(set(exp.raw_scores.tolist())) > 1
    want = []
    for i in range(0, 16, 4):
        g = seq[i:i + 4].tolist()
        mean = sum(g) / 4
        if advantage == "rloo":
            want += [x - (sum(g) - x) / 3 for x in g]
        else:
            sd = math.sqrt(sum((x - mean) ** 2 for x in g) / 3) + 1e-4 if std else 1.0
            want += [(x - mean) / sd for x in g]
    for i in range(16):
        n = int(exp.mask[i].sum())
        assert exp.advantages[i, :n].tolist() == pytest.approx([want[i]] * n, abs=1e-4)
        assert exp.advantages[i, n:].abs().sum() == 0


def test_first_minibatch_has_ratio_one_and_the_kl_loss_adds_beta_times_k3(monkeypatch):
    """The loss handed to backward at the first minibatch (policy == the rollout's): the clipped
    term at ratio 1 is -mean(A) over tokens, and kl_in: loss adds beta * mean k3 to the reference."""
    ratios, real = [], ppo_module.clipped_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, clip=0.2, **kw):
        ratios.append((torch.exp(logprobs - old_logprobs).detach(), mask))
        return real(logprobs, old_logprobs, advantages, mask, clip, **kw)

    monkeypatch.setattr(ppo_module, "clipped_policy_loss", spy)

    def first_loss(beta: float) -> tuple[float, object]:
        ppo = toy_group_rl("grpo", micro=8, rollout_batch_size=16, epochs=2, minibatches=1, kl_coef=beta)
        with torch.no_grad():
            for p in ppo.reference.parameters():
                p.add_(0.3 * torch.randn_like(p))
        losses, backward = [], ppo.acc.backward
        ppo.acc.backward = lambda loss: (losses.append(loss.item()), backward(loss))
        exp, stats = ppo.rollout(grouped(torch.Generator().manual_seed(0), 4, rows=16), copy_reward)
        ppo.learn(exp, stats)
        return sum(losses[:2]), exp  # two micro-batches make the first minibatch

    torch.manual_seed(5)
    loss0, exp0 = first_loss(0.0)
    torch.manual_seed(5)
    loss1, exp1 = first_loss(0.7)
    assert torch.equal(exp0.logprobs, exp1.logprobs) and torch.equal(exp0.ref_logprobs, exp1.ref_logprobs)
    mask, tokens = exp1.mask, exp1.mask.sum()
    assert loss0 == pytest.approx((-masked_sum(exp0.advantages, mask) / tokens).item(), abs=1e-6)
    k3 = masked_sum(kl_penalty(exp1.logprobs, exp1.ref_logprobs, "k3"), mask) / tokens
    assert k3 > 0.05 and loss1 - loss0 == pytest.approx(0.7 * k3.item(), rel=1e-4)
    assert len(ratios) == 2 * 2 * 2
    for ratio, m in ratios[:2]:
        assert (ratio - 1).abs()[m.bool()].max().item() < 1e-6
    assert max((r - 1).abs()[m.bool()].max().item() for r, m in ratios[2:4]) > 1e-4  # the second epoch moved


@pytest.mark.parametrize("norm", ["seq_mean", "constant"])
def test_loss_normalisation_at_ratio_one_by_hand(norm):
    ppo = toy_group_rl("grpo", micro=8, rollout_batch_size=16, epochs=1, minibatches=1, loss_norm=norm,
                       kl_in="reward", stop_ids=[5, 7], max_new_tokens=6)
    losses, backward = [], ppo.acc.backward
    ppo.acc.backward = lambda loss: (losses.append(loss.item()), backward(loss))
    exp, stats = ppo.rollout(grouped(torch.Generator().manual_seed(0), 4, rows=16), lambda p, r: [len(x) for x in r])
    ppo.learn(exp, stats)
    lengths = exp.mask.sum(1)
    assert len(set(lengths.tolist())) > 2
    a = exp.advantages[:, 0]  # one advantage per sequence
    # Ratio 1: each token's loss is -A of its sequence.
    want = -a.mean() if norm == "seq_mean" else -(a * lengths).sum() / (16 * 6)
    token_mean = -(a * lengths).sum() / lengths.sum()
    assert sum(losses) == pytest.approx(want.item(), abs=1e-6)
    assert abs(want - token_mean) > 1e-3  # the normalisations differ on this batch


# ---------------------------------------------------------------- recipes: no critic, plan, bad input


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_recipe_run_builds_no_critic_and_logs_no_value_loss(in_tmp, chat_model, capsys, advantage):
    data = ppo_recipe(in_tmp, chat_model, advantage=advantage)
    data["trainer"]["sampling"]["n"] = 2
    final = run_recipe(recipe_from_dict(data))
    err = capsys.readouterr().err
    assert "2 copies of the base" in err and f"no critic (advantage: {advantage})" in err
    assert ("KL k3 as a loss term" in err) == (advantage == "grpo")
    assert (final / "model.safetensors").is_file() and not (final / "critic").exists()
    updates = [r for r in records(in_tmp / "ppo") if "score" in r]
    assert [r["step"] for r in updates] == [1, 2]
    assert all("value_loss" not in r and math.isfinite(r["policy_loss"]) for r in updates)
    assert all(("kl_loss" in r) == (advantage == "grpo") for r in updates)


def test_interrupted_grpo_run_resumes_exactly(in_tmp, chat_model, capsys):
    import shutil

    from safetensors.torch import load_file

    data = ppo_recipe(in_tmp, chat_model, advantage="grpo")
    data["trainer"]["sampling"]["n"] = 2
    data["run"].update(save_every=1, max_steps=2)
    final = run_recipe(recipe_from_dict(data))
    shutil.copytree(final, in_tmp / "uninterrupted")
    shutil.rmtree(final)  # as if killed after the checkpoint of update 1
    run_recipe(recipe_from_dict(data))
    assert "resumed from" in capsys.readouterr().err and not (final / "critic").exists()
    a, b = load_file(in_tmp / "uninterrupted" / "model.safetensors"), load_file(final / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


def test_group_advantages_refuse_one_sample_per_prompt_and_critic_keys(in_tmp, chat_model):
    data = ppo_recipe(in_tmp, chat_model, advantage="grpo")  # sampling.n: 1
    with pytest.raises(RecipeError, match="trainer.sampling.n must be at least 2"):
        run_recipe(recipe_from_dict(data), dry_run=True)
    data = ppo_recipe(in_tmp, chat_model, advantage="rloo", critic_warmup_updates=2)
    data["trainer"]["sampling"]["n"] = 2
    with pytest.raises(RecipeError, match="builds no critic"):
        run_recipe(recipe_from_dict(data), dry_run=True)
    assert not (in_tmp / "ppo").exists()


# ---------------------------------------------------------------- learning: test_ppo's toy tasks


@pytest.mark.slow  # 8-12 s each; measured seeds 0/1/2: 0.9 first reached at update 12-20
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_toy_emit_the_target_token(advantage):
    scores = train_groups(toy_group_rl(advantage), target_reward, 30)
    assert scores[0] < 0.15 and max(scores) >= 0.9, scores


@pytest.mark.slow
def test_toy_copy_the_last_prompt_token():
    # GRPO only: RLOO learns the emit task above and the story's task (README's 3-seed table), and
    # its copy run, which passed the same bar, cost make test 20 s. With the KL in the reward: with
    # its default k3 loss term (beta 0.01) the 10-update mean measured 0.71 at update 120 (0.77
    # without the std division, 0.90 with the KL in the reward): k3's gradient, beta (1 - p_ref / p),
    # grows without bound where a sampled token's p falls far below p_ref.
    scores = train_groups(toy_group_rl("grpo", kl_in="reward"), copy_reward, 120, lengths=(4, 5))
    assert sum(scores[:10]) / 10 < 0.12 and sum(scores[-10:]) / 10 >= 0.85 and max(scores[-10:]) >= 0.9, scores
