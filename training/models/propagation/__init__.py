"""STCN-style space-time memory network for mask propagation (pure nn.Modules)."""

from training.models.propagation.network import PropagationConfig, PropagationNet

__all__ = ["PropagationConfig", "PropagationNet"]
