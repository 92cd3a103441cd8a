"""What bad *data* raises: PrepError for a file prep cannot continue with (names the file, the line
and the key; the stage exits 2), RowReject for one row that goes to rejects.jsonl with its reason."""
from nemo_ft.errors import InputError

# Every reason a row can be rejected for, in the order a row meets the checks.
REASONS = (
    "blank_line", "invalid_utf8", "invalid_json", "not_object", "missing_key", "empty_value",
    "wrong_type", "bad_conversation", "dpo_prompt_mismatch", "chosen_equals_rejected", "duplicate", "near_duplicate",
    "too_long", "chat_header_not_token_prefix", "dpo_prompt_not_token_prefix", "dpo_over_length", "rm_over_length",
    "rlhf_prompt_too_long", "rlhf_prompt_not_sft_context",
)


class PrepError(InputError):
    """Input that prep cannot continue with; the stage prints it as one line and exits 2."""


class RowReject(Exception):
    """One row that cannot be used; counted and written to rejects.jsonl with `reason` and `detail`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")
