"""The fault-injection suite: the agent under hostile clients, broken upstreams and crashes."""
