print("ddpd")
