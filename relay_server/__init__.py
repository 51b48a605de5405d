"""The MeshNet relay: authenticated registration of nodes and forwarding between them."""
