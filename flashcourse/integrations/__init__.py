"""flashcourse's kernels inside other libraries, each an optional extra: ``hf`` (Hugging Face transformers,
``pip install -e ".[hf]"``, then ``import flashcourse.integrations.hf``)."""
