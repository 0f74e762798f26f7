"""The workload's network plumbing, owned by the embassy the way a CNI plugin owns it.

The workload container starts with no network (Docker's ``none``): a new or restarted
namespace has only loopback until the embassy gives it a link, and the embassy gives it one
only with the gate set as the open sessions require (docs/adr/0009-link-gate.md).

* :mod:`embassy.net.plan` - pure: names, addresses and routes of a workload's link.
* :mod:`embassy.net.rtnl` - a small rtnetlink client (links, addresses, routes).
* :mod:`embassy.net.link` - makes and removes the link of one workload namespace.
* :mod:`embassy.net.ports` - publishes the workload's ports on the host (DNAT).
"""
