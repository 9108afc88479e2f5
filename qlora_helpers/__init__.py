"""Helpers for the QLoRA course kit: one module per idea, each paired with its notebook.

runtime (profiles, dtype, loading), offline (the tiny base model and task), figures, summary,
notebook_setup (the Colab cell) and colab (the Colab route); lora, nf4, double_quant, memory, sft,
merge as the notebooks that teach them land. The kit has no repository address of its own: the
Colab route installs it from a wheel, or from a fork's address given once (``make colab REPO=...``).
"""
import logging

# The wheel's name carries it (qlora_helpers.notebook_setup.WHEEL_NAME); tests check pyproject.toml agrees.
__version__ = "0.1.0"


def _quiet_known_harmless_messages() -> None:
    """One message, filtered before bitsandbytes is first imported, and why.

    On CPUs with AVX512-BF16, importing bitsandbytes 0.50 tries to fetch a faster 4-bit matmul from
    the Hugging Face Hub (the ``kernels`` package, not installed by the kit) and logs a warning,
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels' ...",
    then uses its own kernel. Nothing is wrong, but the red box was the first thing a learner saw
    in every notebook. Only that message is dropped; every other bitsandbytes warning still shows.
    TROUBLESHOOTING.md ("Failed to load CPU gemm_4bit_forward") says the same.
    """
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(keep)


_quiet_known_harmless_messages()
