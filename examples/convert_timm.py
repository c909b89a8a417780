"""A timm model with spatialdrop's dropout, in one line; then ramp it, train it and sample it.

Needs timm (``pip install timm``); runs on the CPU in about half a minute:

    python examples/convert_timm.py

``convert_dropout`` replaces every timm ``DropPath`` and ``DropBlock2d`` by spatialdrop's
``DropPath`` and ``DropBlock2d`` with the same rates, and prints what became what. The
``state_dict`` keys stay the same (load pretrained weights before or after) and so does the
eval-mode output. It warns once that DropBlock's meaning changes: ours drops exactly p and
scales per sample. The converted layers then work with ``DropSchedule``, ``keyed_masks`` and
``mc_predict`` like any spatialdrop layer.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import spatialdrop as sd

model = timm.create_model("resnet50", pretrained=False, drop_block_rate=0.1, drop_path_rate=0.05)
sd.convert_dropout(model, verbose=True)  # the one line

# Ramp every converted layer from 0 up to its own rate: the base rate goes to 1, and each
# layer's factor is the rate it has now (timm's per-block stochastic depth rates are kept).
steps = 3
sched = sd.DropSchedule(model, target_p=1.0, total_steps=steps, scale=lambda name, m: m.p)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(steps):
    sched.step(step)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.3f}, layer4.2.drop_block.p = {model.layer4[2].drop_block.p:.3f}")
sched.step(steps)  # the end of the ramp: every layer at the rate timm gave it

# MC dropout: the dropout layers sample, BatchNorm stays in eval mode (its statistics untouched)
pred = sd.mc_predict(model.eval(), torch.randn(2, 3, 64, 64), samples=4, softmax=True)
print("predictive entropy per image:", [round(float(e), 3) for e in pred.entropy])
