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
    from qlora_helpers import ablations, lora, training
    probe = Probe()
    run = {"lora.lm_loss": lambda: lora.lm_loss(probe, _batch()),
           "training.model_loss": lambda: training.model_loss(probe, _batch()),
           "ablations.heldout_loss": lambda: ablations.heldout_loss(probe, [_batch()]),
           "ablations.logit_error": lambda: ablations.logit_error(probe, Probe(), _batch())}[call]
    with pytest.raises(Seen):
        run()
    assert probe.devices == {"meta"}, f"{call} handed the model tensors on {probe.devices}"

