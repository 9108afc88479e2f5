"""The shared layer: what every lesson stands on, taught by none of them alone.

The lessons' modules (``qlora_helpers.lora``, ``nf4``, ``double_quant``, ``memory``, ``sft``, ``merge``,
...) each hold one idea of one notebook. The modules here hold what all of them use: the fixed
artifacts and models (``artifacts``, ``offline``, ``tiny_model``, ``date_task``, ``real_model``), the
runtime profile and loading (``runtime``, ``cpu_layout``), the one recipe (``recipe``) and the trainable
model it makes (``qlora_model``), the one training loop (``training``), chat data (``chat_data``),
evaluation (``evaluation``), and where figures and claims go (``figures``, ``summary``). They import
nothing from the lessons (``tests/test_architecture.py`` checks it); ``ARCHITECTURE.md`` says why
the kit is laid out this way.
"""
