"""Real parts for tests, tools and `visiond bench`: a private Mosquitto broker, an MQTT
recorder, a child daemon and the synthetic line, shared so there is one way to make each."""
