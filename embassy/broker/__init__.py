"""The key broker: releases weights keys to attested embassies by policy, and logs every
decision (docs/protocol.md, "Weights-key release").
"""
