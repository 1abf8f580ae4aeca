"""The rollout sampler against transformers' `generate`: the same tokens, greedy and seeded sampling, on five
architectures, with left padding, prompts of different lengths, rows that stop at different steps (and so leave the
batch), several samples per prompt, stop strings, LoRA and bf16; the log-probs it keeps against a full forward
pass; the fallback to `generate` for a model it cannot drive."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import with_eos_bias
from transformers import AutoModelForCausalLM, MistralConfig

from rlhfkit.models import add_lora
from rlhfkit.rl import rollout as rollout_module
from rlhfkit.rl import sampler as sampler_module
from rlhfkit.rl.rollout import Sampling, generate, response_logprobs
from rlhfkit.rl.sampler import draw, driver, warp
from rlhfkit.tiny import tiny_config

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]

ARCHS = ("llama", "gpt2", "opt", "qwen2", "gpt_neox")
PROMPTS = ["\n\nHuman: What color is item 3?\n\nAssistant:", "Hi", "Item 7 is", "blue green", "Human: red?",
           "x"]


def tiny_lm(arch: str | MistralConfig, tokenizer, eos_bias: float = 3.0, seed: int = 0):
    """A random tiny model (an architecture's name, or a config) whose head has a bias towards EOS, so that rows
    stop at different steps."""
    torch.manual_seed(seed)
    config = arch if isinstance(arch, MistralConfig) else tiny_config(arch, len(tokenizer), hidden=32, layers=2,
                                                                       heads=4, eos_id=tokenizer.eos_token_id)
    return with_eos_bias(AutoModelForCausalLM.from_config(config), tokenizer.eos_token_id, eos_bias).eval()


def eos_bias_for_greedy(model, prompts, tokenizer) -> None:
    """Sets the EOS bias to the 10% quantile of (best logit - EOS logit) over an unbiased greedy decoding, so that
    greedy responses end at various steps (a tiny random model's logits differ by tenths)."""
    ids, mask = rollout_module.left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        logits = torch.stack(out.logits, 1)
        gaps = logits.max(-1).values - logits[..., tokenizer.eos_token_id]
        model.get_output_embeddings().bias[tokenizer.eos_token_id] = gaps.quantile(0.1)


def prompts_of(tokenizer) -> list[list[int]]:
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    assert len({len(p) for p in prompts}) > 3  # left padding of several widths
    return prompts


def with_generate(model, prompts, tokenizer, sampling: Sampling, monkeypatch):
    """The rollout transformers' `generate` gives (the sampler's fallback), same post-processing."""
    with monkeypatch.context() as patch:
        patch.setattr(rollout_module, "driver", lambda m: "the test's reference")
        return generate(model, prompts, tokenizer, sampling)


def assert_same_rollout(ours, reference, logprob_atol: float = 1e-5) -> None:
    assert torch.equal(ours.input_ids, reference.input_ids)
    assert torch.equal(ours.response_mask, reference.response_mask)
    assert torch.equal(ours.stopped, reference.stopped)
    if reference.logprobs is None:
        assert ours.logprobs is None
    else:
        torch.testing.assert_close(ours.logprobs, reference.logprobs, atol=logprob_atol, rtol=0)


def batch_sizes(model) -> list[int]:
    """Records the rows of every forward call."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    return sizes


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_gives_generates_tokens(arch, tokenizer, monkeypatch):
    model = tiny_lm(arch, tokenizer, eos_bias=0.0)
    assert not isinstance(driver(model), str)
    prompts = prompts_of(tokenizer) * 2
    eos_bias_for_greedy(model, prompts, tokenizer)
    sampling = Sampling(max_new_tokens=12, temperature=0)
    sizes = batch_sizes(model)
    ours = generate(model, prompts, tokenizer, sampling)
    reference = with_generate(model, prompts, tokenizer, sampling, monkeypatch)
    assert_same_rollout(ours, reference)
    assert len(set(ours.response_mask.sum(-1).tolist())) > 2  # rows stopped at different steps ...
    assert sizes[0] == len(prompts) and min(sizes) < len(prompts)  # ... and left the batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("settings, eos_bias", [(dict(temperature=1.0), 3.8),
                                                (dict(temperature=0.7, top_k=20, top_p=0.9), 0.5),
                                                (dict(temperature=1.3, top_p=0.5), 4.0)],
                         ids=["plain", "top-k-top-p", "top-p"])
def test_seeded_sampling_gives_generates_tokens(arch, settings, eos_bias, tokenizer, monkeypatch):
    """Same seed, same tokens: the warpers are generate's to the bit and the draw consumes the random stream as
    torch.multinomial does, for every row of the batch it started with. (The EOS bias makes EOS about 1 in 10 at
    each step under each setting.)"""
    model = tiny_lm(arch, tokenizer, eos_bias)
    prompts = prompts_of(tokenizer) * 2
    sampling = Sampling(max_new_tokens=10, **settings)
    torch.manual_seed(3)
    ours = generate(model, prompts, tokenizer, sampling)
    after_ours = torch.rand(4)
    torch.manual_seed(3)
    reference = with_generate(model, prompts, tokenizer, sampling, monkeypatch)
    assert_same_rollout(ours, reference)
    assert torch.equal(after_ours, torch.rand(4))  # the random stream is left where generate leaves it
    assert len(set(ours.response_mask.sum(-1).tolist())) > 2
    assert len({tuple(r) for r in ours.responses.tolist()}) > len(prompts) // 2  # not one response repeated


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_several_samples_per_prompt_share_its_prefill(arch, tokenizer, monkeypatch):
    """G samples of a prompt: one prefill per prompt (B rows), then N = B * G rows; the tokens are generate's with
    num_return_sequences = G, and a prompt's samples differ."""
    model = tiny_lm(arch, tokenizer)
    prompts = prompts_of(tokenizer)
    G = 4
    sampling = Sampling(max_new_tokens=8, temperature=1.0, samples_per_prompt=G)
    sizes = batch_sizes(model)
    torch.manual_seed(11)
    ours = generate(model, prompts, tokenizer, sampling)
    torch.manual_seed(11)
    reference = with_generate(model, prompts, tokenizer, sampling, monkeypatch)
    assert_same_rollout(ours, reference)
    assert sizes[0] == len(prompts) and sizes[1] == len(prompts) * G
    assert ours.input_ids.shape[0] == len(prompts) * G
    for i in range(len(prompts)):
        group = ours.input_ids[i * G:(i + 1) * G]
        assert (group[:, :ours.prompt_len] == group[0, :ours.prompt_len]).all()
    assert len({tuple(r) for r in ours.responses[:G].tolist()}) > 1


def test_kept_logprobs_equal_a_full_forward_pass(tokenizer):
    model = tiny_lm("qwen2", tokenizer)
    prompts = prompts_of(tokenizer)
    torch.manual_seed(0)
    rollout = generate(model, prompts, tokenizer, Sampling(max_new_tokens=9, temperature=0.8, top_k=30, top_p=0.95,
                                                           samples_per_prompt=2))
    with torch.no_grad():
        full, _ = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 0.8)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.logprobs[mask], full[mask], atol=2e-5, rtol=0)
    assert (rollout.logprobs[~mask] == 0).all()


def test_stop_strings_stop_rows_as_generate_does(tokenizer, monkeypatch):
    model = tiny_lm("llama", tokenizer, eos_bias=0.0)
    prompts = prompts_of(tokenizer) * 3
    # A stop string some responses contain: the most common two-character piece of the unstopped responses' text.
    free = generate(model, prompts, tokenizer, Sampling(max_new_tokens=10, temperature=0))
    texts = [tokenizer.decode(r[m]) for r, m in zip(free.responses, free.response_mask)]
    pieces = {t[i:i + 2] for t in texts for i in range(len(t) - 1)}
    stops = max(pieces, key=lambda p: (0 < sum(p in t for t in texts) < len(texts), sum(p in t for t in texts)))
    sampling = Sampling(max_new_tokens=10, temperature=0, stop_strings=(stops,))
    ours = generate(model, prompts, tokenizer, sampling)
    reference = with_generate(model, prompts, tokenizer, sampling, monkeypatch)
    assert_same_rollout(ours, reference)
    assert ours.response_mask.sum() < free.response_mask.sum()
    torch.manual_seed(5)
    sampled = Sampling(max_new_tokens=10, temperature=1.0, stop_strings=(stops, "e"))
    ours = generate(model, prompts, tokenizer, sampled)
    torch.manual_seed(5)
    assert_same_rollout(ours, with_generate(model, prompts, tokenizer, sampled, monkeypatch))


def test_lora_model_and_bf16_autocast(tokenizer, monkeypatch):
    model = add_lora(tiny_lm("llama", tokenizer), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                     task="CAUSAL_LM")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # an adapter that changes the outputs
    assert not isinstance(driver(model), str)
    prompts = prompts_of(tokenizer)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            torch.manual_seed(2)
            ours = generate(model, prompts, tokenizer, Sampling(max_new_tokens=8, temperature=0.9))
            torch.manual_seed(2)
            reference = with_generate(model, prompts, tokenizer, Sampling(max_new_tokens=8, temperature=0.9),
                                      monkeypatch)
        assert_same_rollout(ours, reference)


def test_a_model_it_cannot_drive_falls_back_to_generate_and_says_why_once(tokenizer, caplog, monkeypatch):
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, sliding_window=4,
                           eos_token_id=tokenizer.eos_token_id)
    model = tiny_lm(config, tokenizer)
    reason = driver(model)
    assert isinstance(reason, str) and "DynamicSlidingWindowLayer" in reason
    monkeypatch.setattr(sampler_module, "_reported", set())
    prompts = prompts_of(tokenizer)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rl.sampler"):
        torch.manual_seed(1)
        first = generate(model, prompts, tokenizer, Sampling(max_new_tokens=6))
        generate(model, prompts, tokenizer, Sampling(max_new_tokens=6))
    warnings = [r.getMessage() for r in caplog.records if "generate" in r.getMessage()]
    assert warnings == [f"sampling with transformers' generate (slower): {reason}"]
    assert first.input_ids.shape[0] == len(prompts) and first.logprobs is not None


def test_warp_and_draw_sample_the_warped_distribution():
    """The draw's frequencies over many rows match softmax(warp(logits)) (chi-square), and tokens top-k / top-p
    remove are never drawn."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    scores = warp(logits, temperature=0.8, top_k=8, top_p=0.9)
    probs = scores.softmax(-1)[0]
    kept = torch.isfinite(scores[0])
    assert 2 <= int(kept.sum()) <= 8
    n = 40_000
    tokens = draw(scores.expand(n, -1), torch.arange(n), n)
    counts = torch.bincount(tokens, minlength=12).float()
    assert (counts[~kept] == 0).all()
    expected = probs[kept] * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 99.9% quantile of chi-square with <= 7 degrees of freedom is 24.3


def test_exponential_draws_are_the_kernels_values_and_stream(monkeypatch):
    """The draws `draw` divides by are those of `exponential_`, to the bit, and the generator is where the kernel
    leaves it; with the check failing, the kernel itself draws them."""
    for uniform_gives_exponential in (True, False):
        monkeypatch.setattr(sampler_module, "_uniform_gives_exponential", lambda: uniform_gives_exponential)
        torch.manual_seed(3)
        kernel, after_kernel = torch.empty(7, 3001).exponential_(1), torch.rand(4)
        torch.manual_seed(3)
        ours, after_ours = sampler_module.exponential((7, 3001), torch.device("cpu")), torch.rand(4)
        assert ours.dtype == torch.float32 and torch.equal(ours, kernel) and torch.equal(after_ours, after_kernel)
    monkeypatch.undo()
    assert sampler_module._uniform_gives_exponential()  # torch 2.13's CPU kernel: the fast path is taken


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_gives_generates_tokens(arch, tokenizer, monkeypatch):
    """Under bf16 autocast the cache holds bf16 keys and values (what attention casts them to anyway): the tokens
    and log-probs are still generate's, greedy and sampled."""
    model = tiny_lm(arch, tokenizer, eos_bias=3.8)
    prompts = prompts_of(tokenizer) * 2
    for sampling in (Sampling(max_new_tokens=10, temperature=0), Sampling(max_new_tokens=10, temperature=1.0)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(4)
            ours = generate(model, prompts, tokenizer, sampling)
            torch.manual_seed(4)
            reference = with_generate(model, prompts, tokenizer, sampling, monkeypatch)
        assert_same_rollout(ours, reference, logprob_atol=0)


# ------------------------------------------------------------------------- one prompt pass for a group of responses
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_group_forward_equals_whole_rows_in_value_and_gradient(arch, tokenizer):
    """GRPO's groups: rows j*G ... share prompt j. Computing each prompt once and its G responses on its keys and
    values gives the log-probs, entropies and parameter gradients of whole rows (left-padded prompts of several
    lengths, responses stopped at different steps), also through micro_batches' cut columns."""
    from rlhfkit.rl.rollout import group_logprobs, micro_batches

    model = tiny_lm(arch, tokenizer)
    torch.manual_seed(3)
    G = 3
    rollout = generate(model, prompts_of(tokenizer), tokenizer, Sampling(max_new_tokens=7, temperature=1.0,
                                                                          samples_per_prompt=G))
    mask = rollout.response_mask
    assert 0 < rollout.stopped.float().mean() < 1  # responses of several lengths

    def forward(grouped: bool):
        model.zero_grad()
        args = (model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
        logprobs, entropy = (group_logprobs(*args, G, 0.9, with_entropy=True, entropy_grad=True) if grouped else
                             response_logprobs(*args, 0.9, with_entropy=True, entropy_grad=True))
        (logprobs[mask].sum() + 0.1 * entropy[mask].sum()).backward()
        return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, grouped = forward(False), forward(True)
    torch.testing.assert_close(grouped[0][mask], whole[0][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped[1][mask], whole[1][mask], atol=1e-5, rtol=0)
    for name, grad in whole[2].items():
        torch.testing.assert_close(grouped[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # micro_batches keeps groups whole (longest first) and each pass computes a prompt once
    rows = list(range(rollout.input_ids.shape[0]))
    parts = micro_batches(rollout, rows, 4, G)  # 4 rows a pass: one group each
    assert sorted(i for mb in parts for i in mb.rows) == rows
    sizes = batch_sizes(model)
    with torch.no_grad():
        for mb in parts:
            assert len(mb.rows) == G and mb.rows == list(range(mb.rows[0], mb.rows[0] + G)) and mb.rows[0] % G == 0
            logprobs, _ = mb.logprobs(model, "cpu", 0.9)
            torch.testing.assert_close(logprobs[mb.take(mask)], mb.take(whole[0])[mb.take(mask)], atol=1e-5, rtol=0)
    assert sizes == [1, G] * len(parts)
    with pytest.raises(ValueError, match="not whole groups"):
        micro_batches(rollout, [0, 1, 3], 4, G)


def test_group_forward_under_gradient_checkpointing_takes_whole_rows(tokenizer):
    """transformers drops the key/value cache of a checkpointed layer in training, so a group's prompt pass would
    leave nothing for its responses: under gradient checkpointing the rows go through whole, with the same values and
    gradients as without it."""
    from rlhfkit.models import _finish
    from rlhfkit.rl.rollout import group_logprobs

    plain = tiny_lm("llama", tokenizer)
    checkpointed = tiny_lm("llama", tokenizer)
    _finish(checkpointed, gradient_checkpointing=True)  # transformers' name for this changed in 5.2x
    torch.manual_seed(3)
    rollout = generate(plain, prompts_of(tokenizer), tokenizer, Sampling(max_new_tokens=5, samples_per_prompt=2))
    mask = rollout.response_mask
    results = []
    for model in (plain, checkpointed):
        model.train()
        logprobs, _ = group_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 2, 1.0)
        logprobs[mask].sum().backward()
        results.append((logprobs.detach(), model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(results[1][0][mask], results[0][0][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


def test_minibatches_of_whole_groups():
    from rlhfkit.rl.setup import Passes, UpdateSettings, minibatch_order

    settings = UpdateSettings(ppo_epochs=2, mini_batch=6, cliprange=0.2, cliprange_high=0.2, dual_clip=0.0,
                              entropy_coef=0.0, loss_agg="token-mean", max_new_tokens=4, temperature=1.0,
                              max_grad_norm=1.0, ptx_coef=0.0, ptx_batch=6, seed=5, passes=Passes(0, 0, "float32",
                                                                                                    False))
    minis = minibatch_order(12, settings, iteration=2, group_size=3)
    assert len(minis) == 4 and all(sorted(m for mini in minis[k:k + 2] for m in mini) == list(range(12))
                                   for k in (0, 2))
    for mini in minis:
        for start in range(0, 6, 3):
            assert mini[start] % 3 == 0 and mini[start:start + 3] == [mini[start] + j for j in range(3)]
    generator = torch.Generator().manual_seed(5 * 1_000_003 + 2)  # G = 1: PPO's shuffles, unchanged
    expected = [torch.randperm(12, generator=generator).tolist() for _ in range(2)]
    assert minibatch_order(12, settings, 2) == [e[i:i + 6] for e in expected for i in (0, 6)]
