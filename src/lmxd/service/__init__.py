"""The daemon's operations as plain calls with typed results: the only way into the scheduler.

Every front (``lmxd.fronts``) translates its wire into these calls. The request values a front
builds (:class:`DecodeRequest` and its prompts, :class:`Exchange`) and the values it gets back
(:class:`DecodeStream`, :class:`~lmxd.results.DecodeResult`, :mod:`lmxd.service.views`) are all
it needs to know.
"""

from lmxd.results import Piece
from lmxd.scheduler.jobs import ChatTurn, Conversation, DecodeRequest, TextPrompt
from lmxd.service.core import DecodeStream, Exchange, Limits, Service
from lmxd.service.views import AgentView, LoadedModel, Registered

__all__ = [
    "AgentView",
    "ChatTurn",
    "Conversation",
    "DecodeRequest",
    "DecodeStream",
    "Exchange",
    "Limits",
    "LoadedModel",
    "Piece",
    "Registered",
    "Service",
    "TextPrompt",
]
