"""fedge's round core: pure maths and decisions shared by the hub, the agent and the simulator.

No MQTT, files or clocks inside: functions and small classes take messages, data and an explicit
``np.random.Generator`` and return decisions and messages. The drivers (``fedge.hub``, ``fedge.edge_agent``,
``fedge.simulate``) own the event loops, persistence and publishing.
"""
