"""The gpu profile's device handling, checked without a GPU. A model whose parameters live on PyTorch's
meta device stands in for a CUDA model: a function that leaves a batch on the CPU hands it over on the
wrong device, as it would on Colab ("Expected all tensors to be on the same device"). The probe records
the devices it is given and stops the call there."""
import pytest
import torch
import torch.nn as nn


class Seen(Exception):
    pass


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, device="meta"))
        self.config = type("Config", (), {"use_cache": False})()
        self.devices = set()

    def forward(self, **inputs):
        self.devices |= {v.device.type for v in inputs.values() if isinstance(v, torch.Tensor)}
        raise Seen


def _batch():
    ids = torch.ones(2, 5, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("call", ["lora.lm_loss", "training.model_loss", "ablations.heldout_loss",
                                  "ablations.logit_error"])
def test_batches_follow_the_model_to_its_device(call):
    from qlora_helpers import ablations, lora
    from qlora_helpers.core import training
    probe = Probe()
    run = {"lora.lm_loss": lambda: lora.lm_loss(probe, _batch()),
           "training.model_loss": lambda: training.model_loss(probe, _batch()),
           "ablations.heldout_loss": lambda: ablations.heldout_loss(probe, [_batch()]),
           "ablations.logit_error": lambda: ablations.logit_error(probe, Probe(), _batch())}[call]
    with pytest.raises(Seen):
        run()
    assert probe.devices == {"meta"}, f"{call} handed the model tensors on {probe.devices}"



# --- tensors made in a notebook cell (or a module) and handed to a model --------------------------------
# The probe above checks the kit's functions. A cell can make the same mistake on its own: 03's
# optimizer-state cell built ``x = torch.randint(...)`` on the CPU and called ``peft_model(input_ids=x)`` on a
# model that Colab loads on cuda:0 (``device_map={"": 0}`` installs no hook that moves inputs). A notebook
# cannot run here on a GPU, so every cell is read instead: a tensor made by a torch factory without
# ``device=`` (and not moved with ``.to``), handed to a model call, is reported with its line.
import ast  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from notebook_cells import code_cells  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = {"randint", "randn", "rand", "tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange",
             "randperm", "LongTensor", "FloatTensor"}
MODEL_NAME = re.compile(r"(^|_)model$", re.I)      # model, peft_model, base_model, merged_model, ...


def _cpu_factory(node) -> bool:
    """``torch.<factory>(...)`` with no ``device=``: a tensor on the CPU whatever the model's device."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords))


def _model_call(node) -> bool:
    f = node.func
    return (isinstance(f, ast.Name) and bool(MODEL_NAME.search(f.id))) or \
        (isinstance(f, ast.Attribute) and (f.attr in ("generate", "forward") or bool(MODEL_NAME.search(f.attr))))


def device_hazards(source: str) -> list[str]:
    """Lines where a tensor made on the CPU by a torch factory is handed to a model call.

    >>> device_hazards("x = torch.randint(0, 9, (2, 3))\\nout = peft_model(input_ids=x, labels=x)")
    ['line 2: x (torch.randint, line 1) handed to peft_model']
    >>> device_hazards("x = torch.randint(0, 9, (2, 3)).to(model.device)\\nout = model(input_ids=x)")
    []
    """
    tree = ast.parse(source)
    made = {t.id: (n.lineno, n.value.func.attr) for n in ast.walk(tree) if isinstance(n, ast.Assign)
            and _cpu_factory(n.value) for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _model_call(node)):
            continue
        callee = ast.unparse(node.func)
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            if isinstance(arg, ast.Name) and arg.id in made:
                line, factory = made[arg.id]
                found.append(f"line {node.lineno}: {arg.id} (torch.{factory}, line {line}) handed to {callee}")
            elif _cpu_factory(arg):
                found.append(f"line {node.lineno}: torch.{arg.func.attr}(...) handed to {callee}")
    return sorted(set(found))


def test_the_check_finds_03s_optimizer_cell_as_it_was():
    """The cell as committed before its fix (03, optimizer state): the check must report it."""
    before = ("x = torch.randint(0, 2048, (2, 32))\n"
              "for name, cls in opts:\n"
              "    peft_model(input_ids=x, labels=x, use_cache=False).loss.backward()\n")
    assert device_hazards(before) == ["line 3: x (torch.randint, line 1) handed to peft_model"]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_no_cell_hands_a_model_a_cpu_tensor(path):
    found = [f"code cell {i}, {h}" for i, src in enumerate(code_cells(path)) for h in device_hazards(src)]
    assert not found, f"{path.name}: make these tensors on the model's device (training.on_model_device): {found}"


def test_no_module_hands_a_model_a_cpu_tensor():
    found = {p.name: h for p in sorted((ROOT / "qlora_helpers").rglob("*.py")) if (h := device_hazards(p.read_text()))}
    assert not found, found
