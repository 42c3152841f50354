"""Model factories imported by tests through the ``module:function`` spec."""

import torch
from torch import nn


class MeanModel(nn.Module):
    """Logits = channel-mean of the input times fixed weights; easy to predict by hand."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(1, num_classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(1, num_classes + 1, dtype=torch.float32).view(-1, 1))
            self.linear.bias.zero_()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.linear(self.dropout(x.mean(dim=(1, 2, 3)).unsqueeze(1)))


def three_classes():
    return MeanModel(3)


def not_a_module():
    return "oops"
