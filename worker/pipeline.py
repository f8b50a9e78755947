"""One study job from start to the delivery rows to send: claim it, analyse it, settle it.

The plain function behind the process-study task; idempotent per job.
"""

from __future__ import annotations

import logging

from service.core.errors import PermanentError
from service.core.models import Job
from service.notify.rules import create_for_job as create_notifications
from worker.analysis import analyse
from worker.claim import AlreadyFinished, claim_job, fail_job, finish_job
from worker.delivery import fan_out
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def process_study(job_id: str, rt: Runtime, worker: str | None = None) -> list[int]:
    """Run one job; returns the ids of the delivery rows to send.

    ``worker``: the Celery node running it, whose heartbeat tells the reconciler if it dies mid-job.
    """
    settings = rt.settings
    claim = claim_job(rt.sessions, settings.spool_dir, job_id, worker)
    if isinstance(claim, AlreadyFinished):
        log.info("job=%s already %s; %d deliveries pending", job_id, claim.status, len(claim.pending))
        return claim.pending
    try:
        analysis = analyse(claim.rows, claim.study_uid, job_id, rt)
    except PermanentError as exc:
        fail_job(rt.sessions, job_id, exc.reason, exc.detail)
        log.warning("job=%s failed reason=%s", job_id, exc.reason)
        return []
    with rt.sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.result = analysis.result
        job.bundle_version = rt.bundle.version
        delivery_ids = fan_out(session, job_id, analysis.outputs, settings.destinations, settings.output_dir)
        final = finish_job(session, job_id, analysis.skipped_reason, analysis.result.get("notes", []))
        # Urgent findings: notification rows in the result's own transaction (sent by the listener).
        create_notifications(session, job_id, settings)
    log.info("job=%s %s outputs=%d deliveries=%d", job_id, final, len(analysis.outputs), len(delivery_ids))
    return delivery_ids
