"""The web console: server-rendered pages at ``/``, ``/jobs/<id>`` and ``/models``.

The pages are shells: they hold no data and need no token to load. Everything they show comes
from the JSON REST API, called by the scripts in ``api/static/`` with the token the user types
into the page (kept in ``sessionStorage``, sent as ``Authorization: Bearer``), so the console can
do exactly what the API lets that token do and nothing more. No inline script or style: the
pages run under :data:`api.security.CONSOLE_CSP`, which allows scripts and styles from this
origin only.
"""

from __future__ import annotations

import uuid

from flask import Blueprint
from flask import render_template

from api.extensions import services
from api.schemas.jobs import MAX_BATCH_SIZE
from api.schemas.training_runs import PROMOTE_MODES
from face_emotions.labels import EMOTIONS

bp = Blueprint("console", __name__, template_folder="templates")


def _page(template: str, page: str, **context: object) -> str:
    settings = services().settings
    return render_template(
        template,
        page=page,
        auth_disabled=settings.auth == "disabled",
        emotions=EMOTIONS,
        **context,
    )


@bp.get("/")
def home() -> str:
    """Submit a batch and follow the jobs."""
    return _page(
        "console/home.html",
        "home",
        max_batch_size=MAX_BATCH_SIZE,
        default_batch_size=min(services().settings.batch_size, MAX_BATCH_SIZE),
        default_faces=services().settings.faces,
    )


@bp.get("/jobs/<uuid:job_id>")
def job(job_id: uuid.UUID) -> str:
    """One job: progress, summary chart, result cards, exports."""
    return _page("console/job.html", "job", job_id=str(job_id))


@bp.get("/models")
def models() -> str:
    """Registered versions, champion, live workers, confusion matrix, promote and train."""
    return _page("console/models.html", "models", promote_modes=PROMOTE_MODES)
