"""Real parts for tests, tools and `visiond bench`: a private Mosquitto broker, an MQTT
recorder and a child daemon, shared so there is one way to start each."""
