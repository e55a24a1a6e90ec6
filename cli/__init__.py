"""agentctl: the thin command line of mtls-agent."""
