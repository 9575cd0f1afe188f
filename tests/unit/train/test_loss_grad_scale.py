"""`grad_scale` undoes a data-parallel wrapper's averaging: the backward pass receives each
micro-batch's loss times the scale, while the window's loss sum stays the unscaled one."""

from __future__ import annotations

import torch

from finetune.train.loss import accumulate_gradients


def _window(grad_scale: float) -> tuple[list[float], float, torch.Tensor]:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    micro = [{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([0.0, 3.0])}]
    seen: list[float] = []

    def loss_fn(model, batch, num_items):
        return (model * batch["x"]).sum() / num_items

    def backward(loss: torch.Tensor) -> None:
        seen.append(float(loss.detach()))
        loss.backward()

    window = accumulate_gradients(weight, micro, loss_fn, window_tokens=4, backward=backward,
                                  grad_scale=grad_scale)
    return seen, float(window.loss_sum), weight.grad.clone()


def test_backward_gets_the_loss_times_the_scale_and_the_sum_is_unscaled() -> None:
    seen, loss_sum, grad = _window(grad_scale=2.0)
    assert seen == [0.5, 3.0]  # (1*1)/4*2 and (2*3)/4*2
    assert loss_sum == 7.0  # 1 + 6 trained-token loss, not scaled
    assert grad.tolist() == [0.5, 1.5]
    assert _window(grad_scale=1.0)[2].tolist() == [0.25, 0.75]
