//go:build !linux

// serve_other.go: the server and the job init need Linux; elsewhere worker
// is a client only.
package main

import "errors"

func serve(serverConfig) error {
	return errors.New("worker -serve runs only on Linux; on this system worker is a client")
}

func runInit(string) int { return 1 }
