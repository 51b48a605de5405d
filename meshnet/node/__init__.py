"""The node's protocol as one sans-IO core (:mod:`meshnet.node.core`) and the effects
it asks its shell for (:mod:`meshnet.node.effects`)."""
