"""The core's services, assembled once by the composition root and shared by every transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from construct.core.accounts import AccountService
from construct.core.admission import Admission
from construct.core.certificates import CertificateService
from construct.core.deletion import AccountDeletion
from construct.core.delivery import DeliveryHub
from construct.core.keys import KeyService
from construct.core.messaging import MessageService
from construct.metrics import Metrics


@dataclass(frozen=True)
class Core:
    accounts: AccountService
    keys: KeyService
    messaging: MessageService
    hub: DeliveryHub
    metrics: Metrics
    # Turns a user id into what may appear in logs (a salted hash).
    log_id: Callable[[str], str]
    # Deletes an account and everything about it (deleteAccount, construct-admin user delete).
    deletion: AccountDeletion
    # Whether new sends are taken now or shed (SERVER_BUSY).
    admission: Admission
    # Sender certificates for sealed sends, and the server keys that sign them.
    certificates: CertificateService
