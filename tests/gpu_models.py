"""ResNet-50 and BERT-base with random weights, exported to ONNX with torch (GPU machine).

Used by the gpu tests and the GPU benchmark; nothing is downloaded. Exported in fp32 only:
a torch `.half()` export gives wrong answers; fp16 comes from ONNX Runtime's converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_resnet50(path: Path) -> str:
    """uint8 NHWC pixels in; normalization inside the graph, so it runs on the GPU."""
    import torch
    import torchvision

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torchvision.models.resnet50(weights=None).eval()
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]) * 255)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]) * 255)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = (pixels.float() - self.mean) / self.std
            return self.body(x.permute(0, 3, 1, 2))

    torch.manual_seed(0)
    net = Net().eval()
    dummy = torch.zeros(2, 224, 224, 3, dtype=torch.uint8)
    torch.onnx.export(
        net,
        (dummy,),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    return str(path)


def export_bert(path: Path, seq: int = 128, **config: Any) -> str:
    """A BERT encoder with random weights: int64 ids and mask [N, seq] -> pooled [N, hidden].
    `config`: BertConfig's fields (default BERT-base); `attn_implementation="eager"` gives the
    form ONNX Runtime's Attention fusion matches."""
    import torch
    from transformers import BertConfig, BertModel

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(BertConfig(**config), add_pooling_layer=True).eval()

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).pooler_output

    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.ones(2, seq, dtype=torch.int64)
    torch.onnx.export(
        net,
        (ids, ids),
        str(path),
        input_names=["ids", "mask"],
        output_names=["pooled"],
        dynamic_axes={"ids": {0: "N"}, "mask": {0: "N"}, "pooled": {0: "N"}},
        opset_version=14,
        dynamo=False,
    )
    return str(path)
