"""Training noise per global row, and what `data.order: global` refuses (issue 29 item 1).

With `data.order: global` the DataModule hands rank r the rows [offset, offset + b) of each optimizer step's
global batch of G rows (data/global_order.py). For the noise to follow the sample rather than the rank, the
step generators (`TrainingModule.step_generator`) are seeded by (seed, global step, tag) without the rank, and
`GlobalRowDraws` turns every `torch.rand` / `torch.randn` drawn from them with a leading dimension of b rows
into a draw of G rows sliced to [offset, offset + b). Every topology with the same G then draws the same
numbers for the same sample: timesteps, ε, posterior samples, condition dropout. The extra cost is drawing
G / b times the per-rank noise, small next to a step.

What still depends on the world size is refused when the mode is on (`refusals`), one message, exit 2:
BatchNorm layers in training mode (statistics over each rank's micro-batch; e.g. `loss.disc_norm: batch`) and
dropout (drawn from the global generator, per rank). Left as is and documented: a non-linear function of the
whole micro-batch (the autoencoder's adaptive GAN weight is made equal across world sizes by averaging its
gradients over ranks, but not across a change of accumulation; VQ dead-code restarts pick from the rank's
encodings).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ldm_lightning.errors import UserError

ROW_DRAWS = (torch.rand, torch.randn)


class WorldDependentError(UserError):
    """`data.order: global` with a part of the model whose result depends on the number of processes."""


class GlobalRowDraws(TorchFunctionMode):
    """Within a training step: draws from `generators` of `rows` leading rows become rows [offset, offset + rows)
    of the same draw for `total` rows (module docstring). Other calls pass through unchanged."""

    def __init__(self, rows: int, offset: int, total: int):
        super().__init__()
        self.rows, self.offset, self.total = rows, offset, total
        self.generators: list[torch.Generator] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = kwargs.get("generator")
        if func not in ROW_DRAWS or g is None or not any(g is x for x in self.generators):
            return func(*args, **kwargs)
        size = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        if not size or size[0] != self.rows or self.total == self.rows:
            return func(*args, **kwargs)
        return func((self.total, *size[1:]), **kwargs)[self.offset:self.offset + self.rows]


def refusals(module: nn.Module) -> list[str]:
    """The parts of `module` whose training result depends on the world size (named by module path)."""
    found = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training is not False:
            found.append(f"{name} is a BatchNorm layer: its statistics are over each process's micro-batch "
                         "(for the autoencoder's discriminator set loss.disc_norm: group)")
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(f"{name} is dropout (p={m.p}): its masks come from each process's global generator "
                         "(set the dropout to 0)")
    return found


def check_world_independent(module: nn.Module) -> None:
    """Raise `WorldDependentError` naming what `data.order: global` cannot keep independent of the world size."""
    found = refusals(module)
    if found:
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise WorldDependentError(
            f"data.order: global promises a run that does not depend on its number of processes, but {shown}. "
            "Fix that, or use data.order: slots (the default), where the run depends on the world size.")
