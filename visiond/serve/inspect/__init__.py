"""Part inspection: trigger -> burst -> aggregate -> store -> evidence -> doors."""
