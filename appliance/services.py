"""What the running app holds: built in the lifespan, stored on ``app.state.services``."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.admin.live import ErrorLog, LiveSampler
from appliance.admin.pulls import PullManager
from appliance.engine.protocol import Engine
from appliance.metrics import Metrics
from appliance.serving.chat import ChatService
from appliance.serving.completions import CompletionService
from appliance.settings import Settings
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.ledger import Ledger
from appliance.store.owner import OwnerSettings

__all__ = ["Services"]


@dataclass(slots=True)
class Services:
    settings: Settings
    db: Database
    engine: Engine
    keys: KeyStore
    ledger: Ledger
    owner: OwnerSettings
    chat: ChatService
    completions: CompletionService
    metrics: Metrics
    pulls: PullManager
    """Model downloads started from the admin page."""
    live: LiveSampler = field(default_factory=LiveSampler)
    """tokens/s for the admin's Live page."""
    errors: ErrorLog = field(default_factory=ErrorLog)
    """Recent server errors and error counts (fed by an after_exception hook)."""
