"""The pull runner (a thread of the listener): takes queued pulls from the database, finds each study on
the Q/R peer (C-FIND) and moves it to our listener (C-MOVE), then records what came of it. The moved
instances arrive as C-STOREs from the PACS and take the intake path of any received study."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.core import pulls
from service.core.errors import PermanentError, TransientError
from service.core.periodic import Periodic
from service.core.pulls import PullStatus
from service.core.settings import Settings
from service.core.tls import client_context
from service.dicomnet.qr import SUCCESS, WARNING, find_studies, move_study
from service.dicomnet.scu import Peer

log = logging.getLogger(__name__)


class PullRunner(Periodic):
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__("pulls", settings.pull_poll_seconds)
        self.settings = settings
        self.sessions = sessions

    def start(self) -> None:
        if self.settings.pull_peer is not None:
            super().start()

    def tick(self) -> None:
        while self.run_one():
            pass

    def run_one(self) -> bool:
        """Run the next queued pull to its end; False when there was none."""
        # A running pull older than this had its runner die (a C-MOVE never outlasts its time-out).
        lease = timedelta(seconds=2 * self.settings.pull_timeout_seconds + 60)
        with self.sessions.begin() as session:
            pull = pulls.claim_next(session, datetime.now(UTC), lease)
            if pull is None:
                return False
            pull_id, study_uid, accession = pull.id, pull.study_instance_uid, pull.accession_number
        log.info("pull=%d running", pull_id)
        outcome = self._pull(study_uid, accession)
        with self.sessions.begin() as session:
            pulls.finish(session, pull_id, outcome.status, **outcome.counts, detail=outcome.detail)
        log.info("pull=%d %s found=%d moved=%d", pull_id, outcome.status, outcome.found, outcome.moved)
        return True

    def _pull(self, study_uid: str | None, accession: str | None) -> _Outcome:
        s = self.settings
        assert s.pull_peer is not None
        peer = Peer(s.pull_peer.ae_title, s.pull_peer.host, s.pull_peer.port, s.pull_peer.tls)
        tls = (lambda: client_context(s)) if peer.tls else None
        calling = s.sender_ae_title
        try:
            studies = find_studies(
                peer,
                calling_ae_title=calling,
                study_uid=study_uid,
                accession=accession,
                timeout=min(s.pull_timeout_seconds, 60.0),
                tls=tls,
            )
            if not studies:
                return _Outcome(PullStatus.NOT_FOUND, detail="C-FIND matched no study")
            moved = failed = 0
            finals: list[str] = []
            for uid in studies:
                result = move_study(
                    peer,
                    uid,
                    calling_ae_title=calling,
                    move_ae_title=s.pull_move_ae_title or s.listener_ae_title,
                    timeout=s.pull_timeout_seconds,
                    tls=tls,
                )
                moved += result.completed
                failed += result.failed
                finals.append(f"0x{result.status:04X}")
        except (PermanentError, TransientError) as exc:
            return _Outcome(PullStatus.FAILED, detail=str(exc))
        ok = all(code in {f"0x{SUCCESS:04X}", f"0x{WARNING:04X}"} for code in finals) and moved > 0
        return _Outcome(
            PullStatus.DONE if ok else PullStatus.FAILED,
            found=len(studies),
            moved=moved,
            failed=failed,
            detail=f"C-MOVE final status {', '.join(finals)}; moved {moved}, failed {failed}",
        )


@dataclass(frozen=True)
class _Outcome:
    status: PullStatus
    found: int = 0
    moved: int = 0
    failed: int = 0
    detail: str = ""

    @property
    def counts(self) -> dict[str, int]:
        return {"found": self.found, "moved": self.moved, "failed": self.failed}
