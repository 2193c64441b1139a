"""fedge: federated transfer learning on edge devices.

Sub-packages: ``fedge.protocol`` (wire format and transports, shared by hub and agent),
``fedge.edge_agent`` (the device agent), ``fedge.export`` (model zoo, pre-training, export),
``fedge.hub`` (the hub daemon), ``fedge.devices`` (device profiles and provisioning) and
``fedge.datasets`` (source data sets, device partitions, domain shifts).
"""

__version__ = "0.1.0"
