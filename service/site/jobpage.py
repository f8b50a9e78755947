"""What a job's page shows of the site loop: the readers' verdicts, this user's own, the model's calls
they judge, and whether the job's files were purged."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.core.models import Job
from service.core.retention import purged_at
from service.site.feedback import job_feedback
from service.site.findings import study_call


def job_site_context(session: Session, job: Job, username: str) -> dict[str, Any]:
    given = job_feedback(session, job.id)
    call = study_call(job.result)
    return {
        "feedback": given,
        "my_verdicts": {f.finding: f.verdict for f in given if f.username == username},
        "model_present": sorted(call.present) if call else [],
        "model_absent": sorted(set(call.scores) - call.present) if call else [],
        "purged_at": purged_at(session, job),
    }
