"""Gradient checkpointing: each decoder block's activations recomputed in the backward pass.

    model.gradient_checkpointing_enable()      # Hugging Face's names; a LoRAModel passes them on
    model.gradient_checkpointing_disable()

Enabled, every block of the model (GPT's `blocks`, a Llama's `model.layers`) runs its forward
without recording a graph and keeps only its input. When the backward reaches the block's
output it runs the block again, this time recording, and backpropagates through that: the
peak then holds one block's activations (its attention probabilities, MLP hidden states, ...)
at a time instead of every block's, for about one more forward per step.

The gradients are the ones without checkpointing: the rerun is the same computation on the
same input, and every random Generator inside the block (dropout's, LoRA dropout's) is wound
back to where it stood before the first run, so the masks are the same; afterwards it is set
to where it was, so the random streams go on as they would have.
"""
import numpy as np

from fastlora.autograd.tensor import Tensor, is_grad_enabled, make_result, no_grad

# where the repeated blocks live, by model: GPT, and the Llama family (transformers' names)
BLOCK_LISTS = ("blocks", "model.layers")


class GradientCheckpointing:
    """Mixin for CausalLM: gradient_checkpointing_enable/disable and is_gradient_checkpointing."""

    def _checkpoint_blocks(self):
        for path in BLOCK_LISTS:
            try:
                return list(self.get_submodule(path))
            except (AttributeError, KeyError, ValueError):
                continue
        raise ValueError(f"{type(self).__name__} has none of {list(BLOCK_LISTS)}: no blocks to checkpoint")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Recompute each block's activations in the backward pass instead of keeping them.
        gradient_checkpointing_kwargs is accepted for Hugging Face's signature; its use_reentrant
        makes no difference here."""
        for block in self._checkpoint_blocks():
            if not isinstance(block.__dict__.get("forward"), CheckpointedForward):
                # an instance attribute shadows the class's forward, for this block only
                object.__setattr__(block, "forward", CheckpointedForward(block))
        return self

    def gradient_checkpointing_disable(self):
        for block in self._checkpoint_blocks():
            if isinstance(block.__dict__.get("forward"), CheckpointedForward):
                object.__delattr__(block, "forward")
        return self

    @property
    def is_gradient_checkpointing(self):
        return any(isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in self._checkpoint_blocks())


class CheckpointedForward:
    """block.forward(x, *constants) that records one node in place of the block's graph."""

    def __init__(self, block):
        self.block = block  # a plain attribute: deepcopy (model.copy()) maps it to the copy's block

    def __call__(self, x, *constants):
        block, forward = self.block, type(self.block).forward
        trainable = [p for p in block.parameters() if p.requires_grad]
        if not is_grad_enabled() or not (x.requires_grad or trainable):
            return forward(block, x, *constants)  # nothing will be backpropagated: no need to save
        generators = _generators(block)
        before = [g.bit_generator.state for g in generators]
        with no_grad():
            out = forward(block, x, *constants)

        def backward(grad):
            after = [g.bit_generator.state for g in generators]
            for g, state in zip(generators, before):
                g.bit_generator.state = state
            again = Tensor(x.data, requires_grad=x.requires_grad)
            forward(block, again, *constants).backward(grad)  # the block's parameters accumulate here
            for g, state in zip(generators, after):
                g.bit_generator.state = state
            return (again.grad,) + (None,) * len(trainable)

        # the trainable parameters are parents too, so the node is recorded even when x needs no
        # gradient (LoRA on a frozen embedding); their gradients come from the rerun's backward
        return make_result(out.data, (x, *trainable), backward)


def _generators(block):
    """Every numpy Generator held by the block's modules (dropout's rng, LoRA's _rng), once each."""
    found = {}
    for module in block.modules():
        for value in vars(module).values():
            if isinstance(value, np.random.Generator):
                found[id(value)] = value
    return list(found.values())
