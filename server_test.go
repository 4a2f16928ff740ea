//go:build linux

package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

func TestEchoHasNoShell(t *testing.T) {
	ts := newTestServer(t)
	out, j := ts.runWait("echo", "a; rm -rf /")
	if out != "a; rm -rf /\n" || j.Status != statusCompleted {
		t.Fatalf("got %q, %s", out, j.Status)
	}
}

func TestRoleMatrix(t *testing.T) {
	ts := newTestServer(t)
	own := map[string]string{} // owner → a job of theirs
	for _, who := range []string{"admin", "alice", "bob"} {
		j := ts.run(who, runRequest{Command: "sleep", Args: []string{"60"}})
		own[who] = j.ID
	}
	type want struct{ run, list, status, log, stop int }
	// For each caller: on their own job (where they can have one), and on alice's.
	cases := []struct {
		who          string
		ownJob       bool
		target       string
		canRun       bool
		status, stop int
		listSeesAll  bool
		listSeesSelf bool
	}{
		{who: "admin", target: "alice", canRun: true, status: 200, stop: 200, listSeesAll: true},
		{who: "alice", target: "alice", canRun: true, status: 200, stop: 200, listSeesSelf: true},
		{who: "bob", target: "alice", canRun: true, status: 404, stop: 404, listSeesSelf: true},
		{who: "vera", target: "alice", canRun: false, status: 200, stop: 403, listSeesAll: true},
		{who: "norole", target: "alice", canRun: false, status: 403, stop: 403},
		{who: "wizard", target: "alice", canRun: false, status: 403, stop: 403},
	}
	_ = want{}
	for _, c := range cases {
		t.Run(c.who, func(t *testing.T) {
			code, body := ts.do(c.who, "POST", "/v1/jobs", runRequest{Command: "true"})
			if (code == http.StatusCreated) != c.canRun {
				t.Errorf("run: %d %s", code, body)
			}
			if !c.canRun && code != http.StatusForbidden {
				t.Errorf("run refused with %d, want 403", code)
			}
			code, body = ts.do(c.who, "GET", "/v1/jobs", nil)
			switch {
			case c.status == 403:
				if code != 403 {
					t.Errorf("list: %d, want 403", code)
				}
			default:
				var jobs []Job
				json.Unmarshal(body, &jobs)
				owners := map[string]bool{}
				for _, j := range jobs {
					owners[j.Owner] = true
				}
				if c.listSeesAll && !(owners["admin"] && owners["alice"] && owners["bob"]) {
					t.Errorf("list sees owners %v, want all", owners)
				}
				if c.listSeesSelf && (len(owners) != 1 || !owners[c.who]) {
					t.Errorf("list sees owners %v, want only %s", owners, c.who)
				}
			}
			id := own[c.target]
			for _, ep := range []struct{ method, path string }{{"GET", "/v1/jobs/" + id}, {"GET", "/v1/jobs/" + id + "/log?follow=0"}} {
				if code, body := ts.do(c.who, ep.method, ep.path, nil); code != c.status {
					t.Errorf("%s %s: %d %s, want %d", ep.method, ep.path, code, body, c.status)
				}
			}
			if id, ok := own[c.who]; ok { // own job: always visible
				if code, _ := ts.do(c.who, "GET", "/v1/jobs/"+id, nil); code != 200 {
					t.Errorf("own job status: %d", code)
				}
			}
		})
	}
	// Stops last: they end the jobs.
	for _, c := range []struct {
		who, target string
		want        int
	}{{"vera", "alice", 403}, {"bob", "alice", 404}, {"norole", "alice", 403}, {"wizard", "alice", 403}, {"alice", "alice", 200}, {"bob", "bob", 200}, {"admin", "admin", 200}} {
		code, body := ts.do(c.who, "POST", "/v1/jobs/"+own[c.target]+"/stop", nil)
		if code != c.want {
			t.Errorf("stop %s's job as %s: %d %s, want %d", c.target, c.who, code, body, c.want)
		}
	}
	_ = strings.TrimSpace
}
