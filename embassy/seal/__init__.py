"""The seal: netfilter rules in a workload's own network namespace.

* :mod:`embassy.seal.rules` - the seal as data (pure): :func:`seal_rules`, :class:`SealRules`,
  :func:`parse_saved`.
* :mod:`embassy.seal.firewall` - the :class:`Firewall` interface and :class:`SealState`.
* :mod:`embassy.seal.netns` - the single setns worker thread.
* :mod:`embassy.seal.iptables` - the python-iptables backend (imports iptc; import it only
  where the daemon really seals).
"""

from __future__ import annotations

from embassy.seal.firewall import Firewall, SealState, state_of
from embassy.seal.rules import SealRules, parse_saved, seal_rules

__all__ = ["Firewall", "SealRules", "SealState", "parse_saved", "seal_rules", "state_of"]
