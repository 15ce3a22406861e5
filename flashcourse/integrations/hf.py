"""flashcourse as a Hugging Face transformers attention backend: ``attn_implementation="flashcourse"``.

    import flashcourse.integrations.hf  # registers the backend "flashcourse" (once per process)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flashcourse")
    model.set_attn_implementation("flashcourse")  # or switch a loaded model

transformers treats a backend whose name contains "flash" as a FlashAttention kernel with flash-attn's
API, and it maintains the machinery around one, which this module reuses rather than rewrites:

- the attention function, ``flash_attention_forward``: takes the model's (B, H, N, d) tensors to
  flash-attn's (B, N, H, d) and calls ``_flash_attention_forward``, which removes padding (the keys
  and queries of each sequence packed one after another, ``cu_seqlens`` marking where each starts, for
  ``flash_attn_varlen_func``), recognises sequences packed into one row by their ``position_ids``,
  turns the model's ``sliding_window`` into flash-attn's ``window_size`` and passes ``softcap``, the
  scale and the dropout probability (the model's ``attention_dropout`` in training, 0 in eval);
- the mask function, ``flash_attention_mask``: the (B, Nk) padding mask, or None when nothing is
  padded (causal masking and windows are the kernel's job, not a mask's);
- where the kernels come from: transformers looks flash-attn's functions up, by backend name, in
  ``modeling_flash_attention_utils._lazy_imports``; for "flashcourse" it now gets flashcourse's
  flash-attn compatible functions (``flash_attn_func``, ``flash_attn_varlen_func``,
  ``flash_attn_with_kvcache`` for paged caches, ``unpad_input`` / ``pad_input``). Grouped-query heads
  need nothing: the kernels take H % Hkv == 0.

Decoding with a KV cache (``generate``) runs the same path: the cache hands the attention function
all keys so far, and the bottom-right aligned causal mask lets the new queries see them all. Not
supported: attention sinks (``s_aux``, gpt-oss), which the kernels do not compute, and
``output_attentions``, which no FlashAttention kernel returns (use "eager" for those).
The hook into ``_lazy_imports`` is transformers-internal, so the ``hf`` extra pins the range tests/test_hf.py
passed with: transformers 5.17 to 5.24 (another version warns at import).
"""

import logging
import warnings

import flashcourse

if not flashcourse.HAS_TRITON:
    raise ImportError("flashcourse's transformers backend runs the Triton kernels, and Triton runs on Linux only "
                      "(on macOS or Windows use WSL2, a container or a hosted notebook: README.md, 'Which machines')")
from flashcourse import flash_attn_interface  # noqa: E402  (needs Triton)

try:
    from packaging.version import Version  # a dependency of transformers
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers import modeling_flash_attention_utils as flash_utils
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import flash_attention_mask
except ImportError as e:  # not installed, or a transformers too old to have these modules
    raise ImportError(
        f"flashcourse.integrations.hf needs Hugging Face transformers 5.x ({e}); install the extra with "
        f'pip install -e ".[hf]" from the repository root'
    ) from e

__all__ = ["NAME", "attention_forward", "register"]

NAME = "flashcourse"
TESTED = ((5, 17), (5, 24))  # the (major, minor) range of the `hf` extra in pyproject.toml
TESTED_TEXT = "transformers {}.{} to {}.{}".format(*TESTED[0], *TESTED[1])


def attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The backend: transformers' flash-attention wrapper, which calls flashcourse's kernels (see above).

    query (B, H, Nq, d), key and value (B, Hkv, Nk, d) -> (out (B, Nq, H, d), None).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} adds attention sinks (s_aux) to its softmax, which flashcourse's kernels "
            f'do not compute; load this model with attn_implementation="sdpa" or "eager"'
        )
    return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _kernels():
    """flash-attn's five functions, in the order transformers' ``_lazy_imports`` returns them: flashcourse's."""
    return (flashcourse.flash_attn_func, flashcourse.flash_attn_varlen_func, flashcourse.flash_attn_with_kvcache,
            flash_attn_interface.pad_input, flash_attn_interface.unpad_input)


def _plug_in_kernels() -> None:
    """Make transformers' flash-attention machinery load flashcourse's functions for the backend NAME."""
    lazy_imports = getattr(flash_utils, "_lazy_imports", None)
    if lazy_imports is None:
        raise ImportError(
            f"transformers {transformers.__version__} has no modeling_flash_attention_utils._lazy_imports, where "
            f"flashcourse plugs its kernels in; install a tested version with "
            f'pip install -e ".[hf]" ({TESTED_TEXT})'
        )
    if getattr(lazy_imports, "flashcourse_original", None) is not None:
        return  # already plugged in

    def _lazy_imports(implementation, *args, **kwargs):
        if implementation == NAME:
            return _kernels()
        return lazy_imports(implementation, *args, **kwargs)

    _lazy_imports.flashcourse_original = lazy_imports
    flash_utils._lazy_imports = _lazy_imports


class _SilenceNoOpCast(logging.Filter):
    """Drop transformers' "Casting fp32 inputs back to torch.float32": flash-attn has no float32, so transformers
    announces a cast, which for flashcourse (float32 kernels) casts float32 to float32 and changes nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "back to torch.float32 " not in record.getMessage()


def register() -> None:
    """Register "flashcourse" with transformers' attention and mask interfaces (importing this module does)."""
    if not TESTED[0] <= Version(transformers.__version__).release[:2] <= TESTED[1]:
        warnings.warn(
            f"flashcourse's transformers backend is tested with {TESTED_TEXT}, this is transformers "
            f'{transformers.__version__}; if a model misbehaves, pip install -e ".[hf]" installs a tested one',
            stacklevel=2,
        )
    _plug_in_kernels()
    flash_logger = logging.getLogger(flash_utils.__name__)
    if not any(isinstance(f, _SilenceNoOpCast) for f in flash_logger.filters):
        flash_logger.addFilter(_SilenceNoOpCast())
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


register()
