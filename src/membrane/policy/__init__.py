"""Network policy: parsing and validation of NetworkPolicy, CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy documents, the compiler to datapath policy entries, and an
independent reference evaluator that explains verdicts."""

from membrane.datapath.policy_entries import EndpointPolicy, PolicyEntry, lookup
from membrane.policy.compile import CompileCache, compile_policies, policy_cidrs
from membrane.policy.model import Policy
from membrane.policy.parse import parse_documents, parse_with_documents
from membrane.policy.reference import Decision, evaluate, explain
from membrane.policy.rules import address_prefixes
from membrane.policy.ruletable import RuleRef, RuleTable
from membrane.policy.universe import AllowLocalhost, EndpointInfo, Universe

__all__ = [
    "AllowLocalhost",
    "CompileCache",
    "Decision",
    "EndpointInfo",
    "EndpointPolicy",
    "Policy",
    "PolicyEntry",
    "RuleRef",
    "RuleTable",
    "Universe",
    "address_prefixes",
    "compile_policies",
    "evaluate",
    "explain",
    "lookup",
    "parse_documents",
    "parse_with_documents",
    "policy_cidrs",
]
