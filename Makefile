# worker: one static binary. `make demo` runs it, `make test` tests it (as root).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
GO ?= go
export CGO_ENABLED ?= 0

.PHONY: build test test-vm bench demo cross clean

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/worker .

# The race detector needs cgo; the binary under test is still built static.
test: build
	$(GO) vet ./...
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 15m ./...

# Only the cgroup v2 checks: boots a kernel in qemu with the test binary as
# /init (the kernel and busybox are fetched with apt once, then cached).
test-vm:
	$(GO) test -run '^TestCgroupV2VM$$' -v -count=1 -timeout 10m .

# Each benchmark reports ratios against a floor measured in the same run.
bench: build
	$(GO) test -run '^$$' -bench 'JobStart|JobsPerSecond' -benchtime 200x -timeout 20m .
	$(GO) test -run '^$$' -bench 'FollowerThroughput' -benchtime 3x -timeout 20m .
	$(GO) test -run '^$$' -bench 'ThousandFollowers|ServerRSSUnderLargeOutput' -benchtime 1x -timeout 20m .

cross:
	GOOS=darwin GOARCH=arm64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/worker-darwin-arm64 .
	GOOS=darwin GOARCH=amd64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/worker-darwin-amd64 .
	GOOS=windows GOARCH=amd64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/worker-windows-amd64.exe .
	GOOS=linux GOARCH=arm64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/worker-linux-arm64 .

# A real server on a temporary state dir, a few jobs and their output, then shut down.
demo: build
	@./demo.sh

clean:
	rm -rf bin

