"""Edit requests and dataset loaders (CounterFact, MQuAKE, EasyEdit, zsRE-MEND, JSONL, fact worlds)."""

from superedit.data.loaders import FORMATS, detect_format, load_requests, save_requests_jsonl
from superedit.data.requests import EditRequest
from superedit.data.sampling import counterfactual_requests_from_facts, sample_requests

__all__ = [
    "EditRequest",
    "FORMATS",
    "counterfactual_requests_from_facts",
    "detect_format",
    "load_requests",
    "sample_requests",
    "save_requests_jsonl",
]
