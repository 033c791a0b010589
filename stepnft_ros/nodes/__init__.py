"""rclpy nodes: thin adapters that parse parameters, convert messages (ros_io) and call the core."""
