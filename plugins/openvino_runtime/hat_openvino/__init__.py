"""hat-openvino: the `openvino` runtime for hatcli (`--runtime openvino`)."""
