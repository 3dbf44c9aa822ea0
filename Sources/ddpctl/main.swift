print("ddpctl")
