"""What can go wrong in the orchestrator's domain, independent of the HTTP layer that reports it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lucerna.orchestrator.jobs import JobState


class OrchestratorError(Exception):
    """A request the orchestrator refuses, with the HTTP status that says why."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(OrchestratorError):
    """A malformed request: not JSON, a missing or mistyped field, a bad query parameter (400)."""

    status = 400


class UnprocessableError(OrchestratorError):
    """A well-formed request naming what does not exist here: an unknown model or priority (422)."""

    status = 422


class NotFoundError(OrchestratorError):
    """An unknown job, or a study the orchestrator never saw (404)."""

    status = 404


class IllegalTransitionError(OrchestratorError):
    """A state change the job's state machine does not allow (409)."""

    status = 409

    def __init__(self, job_id: str, from_state: JobState, to_state: JobState) -> None:
        super().__init__(f"job {job_id} is {from_state.value}; it cannot become {to_state.value}")
        self.from_state = from_state
        self.to_state = to_state


class ConfigurationError(Exception):
    """Rules or manifests that cannot be used; the message names the file and what is wrong."""
