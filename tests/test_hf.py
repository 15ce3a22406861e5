"""flashcourse as a Hugging Face transformers backend (``attn_implementation="flashcourse"``) against transformers' own.

Tiny randomly initialised models built from a config (no downloads): a one-layer Llama with grouped heads, a Mistral
whose sliding window (5) is shorter than the sequences, and a Gemma 2 with soft-capped scores and
alternating windowed / full layers. Each runs twice, with the same weights: once on flashcourse, once on
the reference backend ("sdpa"; "eager" for Gemma 2, whose soft-capping SDPA cannot do). The weights are
drawn large (std 0.2) so that the scores spread and a wrong mask, window or cap changes the logits. A spy
on flashcourse's functions checks that they ran: flash_attn_func for a batch without padding,
flash_attn_varlen_func (the packed sequences) for one with padding.
"""

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason='needs Hugging Face transformers: pip install -e ".[hf]"')

import flashcourse  # noqa: E402
import flashcourse.integrations.hf as hf  # noqa: E402
from transformers import modeling_flash_attention_utils as flash_utils  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2)
CONFIGS = {  # model -> (config, the backend it is compared with)
    "llama": (lambda: transformers.LlamaConfig(**SMALL), "sdpa"),
    "mistral": (lambda: transformers.MistralConfig(**SMALL, sliding_window=5), "sdpa"),
    "gemma2": (lambda: transformers.Gemma2Config(**{**SMALL, "num_hidden_layers": 2},  # a windowed and a full layer
                                                 sliding_window=5, attn_logit_softcapping=2.0, query_pre_attn_scalar=8),
               "eager"),
}
B, N = 2, 11  # batch, prompt length


def pair(model: str, device, dtype=torch.float32, **overrides):
    """The same random weights twice: (on flashcourse, on the reference backend)."""
    make_config, reference = CONFIGS[model]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=hf.NAME)
    theirs = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
    theirs.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == hf.NAME and theirs.config._attn_implementation == reference
    return ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()


def batch(padding, device):
    """Token ids (B, N) and their attention mask (None without padding): row 0 padded by 4, row 1 by 1."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SMALL["vocab_size"], (B, N), generator=g)  # 0 is the padding token
    if padding is None:
        return ids.to(device), None
    mask = torch.ones(B, N, dtype=torch.long)
    for row, pad in enumerate((4, 1)):
        mask[row, slice(0, pad) if padding == "left" else slice(N - pad, N)] = 0
    return ids.to(device), mask.to(device)


@pytest.fixture
def calls(monkeypatch):
    """How often flashcourse's flash_attn_func and flash_attn_varlen_func ran (transformers' cache of them reset)."""
    counts = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}
    for name in counts:
        function = getattr(flashcourse, name)

        @functools.wraps(function)  # transformers reads the signature to know which arguments it takes
        def spy(*args, _name=name, _function=function, **kwargs):
            counts[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(flashcourse, name, spy)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)  # transformers loads the spies next time
    yield counts
    flash_utils._loaded_implementation = None  # and the real functions after the test


def logits_and_gradients(model, ids, mask, kept):
    """The logits at the kept positions and the gradients of a random projection of them, in float32."""
    weights = torch.randn(*ids.shape, SMALL["vocab_size"], generator=torch.Generator().manual_seed(2))
    logits = model(ids, attention_mask=mask).logits[kept]
    (logits.float() * weights.to(ids.device)[kept]).sum().backward()
    return [logits.detach().float()] + [p.grad.float() for p in model.parameters()]


@pytest.mark.parametrize("model,padding,dtype", [
    ("llama", None, torch.float32), ("llama", "left", torch.float32), ("llama", "right", torch.float32),
    ("llama", "left", torch.bfloat16),
    ("mistral", None, torch.float32), ("mistral", "left", torch.float32),
    ("gemma2", None, torch.float32), ("gemma2", "right", torch.float32),
])
def test_logits_and_gradients_match(model, padding, dtype, device, calls):
    """float32: within 2e-5 (logits) and 1e-4 (gradients) of the reference. bfloat16: off the float32
    reference by at most twice as much as the reference backend in bfloat16 (flash-attn's rule)."""
    ids, mask = batch(padding, device)
    kept = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()  # padded rows: no reference
    ours, theirs = pair(model, device, dtype)
    got, ref_low = (logits_and_gradients(m, ids, mask, kept) for m in (ours, theirs))
    ref = ref_low if dtype == torch.float32 else logits_and_gradients(pair(model, device)[1], ids, mask, kept)
    names = ["logits"] + [name for name, _ in ours.named_parameters()]
    for name, x, x_ref, x_low in zip(names, got, ref, ref_low):
        assert torch.isfinite(x).all(), name
        if dtype == torch.float32:
            tol = 2e-5 if name == "logits" else 1e-4
            torch.testing.assert_close(x, x_ref, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
        else:
            assert (x - x_ref).abs().max() <= 2 * (x_low - x_ref).abs().max() + 1e-5, name
    layers = ours.config.num_hidden_layers
    assert calls == ({"flash_attn_func": layers, "flash_attn_varlen_func": 0} if mask is None else
                     {"flash_attn_func": 0, "flash_attn_varlen_func": layers})


@pytest.mark.parametrize("model", ["llama", "mistral"])
def test_greedy_generate_matches(model, device, calls):
    """Greedy decoding in float32 with a KV cache, from left-padded prompts, gives the reference's tokens.

    Llama decodes through flash_attn_varlen_func (a padded key is always in view); Mistral's window (5) soon
    leaves the padding behind, and its later steps go to flash_attn_func with one query and 5 keys.
    """
    ours, theirs = pair(model, device)
    ids, mask = batch("left", device)
    new = 5
    outputs = [m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True,
                          return_dict_in_generate=True, pad_token_id=0) for m in (ours, theirs)]
    assert outputs[0].sequences.shape == (B, N + new)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].past_key_values.get_seq_length() == N + new - 1  # the cache held every token but the last
    layers = ours.config.num_hidden_layers
    assert calls == ({"flash_attn_func": 0, "flash_attn_varlen_func": new * layers} if model == "llama" else
                     {"flash_attn_func": (new - 1) * layers, "flash_attn_varlen_func": layers})


def test_packed_sequences_match(device, calls):
    """Sequences packed into one row, told apart by position_ids restarting at 0 (padding-free training), give
    the logits of each sequence run alone on the reference backend: they run as flash_attn_varlen_func's sequences."""
    ours, theirs = pair("mistral", device)
    ids = batch(None, device)[0].reshape(1, -1)
    lengths = (9, 13)  # the second longer than the window
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    logits = ours(ids, position_ids=position_ids).logits
    alone = torch.cat([theirs(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(logits, alone, atol=2e-5, rtol=2e-5)
    assert calls == {"flash_attn_func": 0, "flash_attn_varlen_func": ours.config.num_hidden_layers}


def test_dropout_in_training(device):
    """model.train() passes the config's attention_dropout to the kernels: seeded, it repeats; eval() turns it off."""
    ours, _ = pair("llama", device, attention_dropout=0.5)
    ids, mask = batch("left", device)

    def loss(seed):
        torch.manual_seed(seed)
        return ours(ids, attention_mask=mask, labels=ids).loss

    ours.train()
    first, again = loss(0), loss(0)
    first.backward()
    assert torch.equal(first, again)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())
    ours.eval()
    assert not torch.allclose(loss(0), first)  # Llama has no other dropout: the kernels dropped weights


def test_attention_sinks_are_refused():
    """gpt-oss-style sinks (s_aux) are not computed by the kernels: a clear error, not a silently wrong softmax."""
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="sinks.*sdpa"):
        hf.attention_forward(torch.nn.Identity(), q, q, q, None, s_aux=torch.zeros(2))
