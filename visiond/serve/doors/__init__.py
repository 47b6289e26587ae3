"""The plant's doors onto the one inspection core: OPC UA and Modbus TCP (MQTT's is in control.py, HTTP later)."""
