"""The linearisation hub: ``pb.linearize`` and the structure it reads from the user's function."""

from paribus._linearize._build import linearize
from paribus._linearize._plan import LeafPlan, Plan
from paribus._linearize.linearization import Linearization

__all__ = ["LeafPlan", "Linearization", "Plan", "linearize"]
