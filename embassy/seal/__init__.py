"""The seal: a workload's link gate and the layer-3 rules in its own network namespace.

* :mod:`embassy.seal.rules` - the layer-3 seal as data (pure): :func:`seal_rules`,
  :class:`SealRules`, :func:`parse_saved`, :class:`L3State`.
* :mod:`embassy.seal.netns` - the single setns worker thread.
* :mod:`embassy.seal.iptables` - the python-iptables backend (imports iptc).
* :mod:`embassy.seal.gate` - closes and opens a workload's link: link state, then rules.
* :mod:`embassy.seal.occupants` - who besides the workload is in its namespace (/proc).
* :mod:`embassy.seal.keeper` - the seal of one workload: its link, the gate, quarantine,
  the check a key release makes.
"""

from __future__ import annotations

from embassy.seal.rules import L3State, SealRules, open_rules, parse_saved, seal_rules, state_of

__all__ = ["L3State", "SealRules", "open_rules", "parse_saved", "seal_rules", "state_of"]
