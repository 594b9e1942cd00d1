"""Billing's announcements (apps above billing subscribe; billing imports none of them).

``llm_call_settled``: a gateway call's ledger row got its final outcome (sent with
``call=<LlmCall>``, once per call). A write-ahead row is created ``in_flight`` before the
request leaves and completed in place by an UPDATE, which ``post_save`` never sees; this is
the one moment a call's tokens, cost and outcome are known.
"""

from django.dispatch import Signal

llm_call_settled = Signal()
