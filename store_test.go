package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newTestRecord(owner string) record {
	return record{Job: Job{ID: newID(), Owner: owner, Command: "true", Args: []string{}, Status: statusRunning, CreatedAt: time.Now().UTC()}}
}

func TestStoreConcurrentUpdatesAreAllKept(t *testing.T) {
	dir := t.TempDir()
	s, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := 0; i < 8; i++ {
		r := newTestRecord("alice")
		if err := s.create(r); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.ID)
	}
	var wg sync.WaitGroup
	for _, id := range ids {
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 25; i++ {
					if _, err := s.update(id, func(r *record) { r.Args = append(r.Args, "x") }); err != nil {
						t.Error(err)
					}
				}
			}()
		}
	}
	wg.Wait()
	reloaded, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		mem, _ := s.get(id)
		disk, ok := reloaded.get(id)
		if !ok || len(mem.Args) != 100 || len(disk.Args) != 100 {
			t.Fatalf("job %s: %d args in memory, %d on disk (found %v), want 100", id, len(mem.Args), len(disk.Args), ok)
		}
	}
}

func TestStoreRecordsAreAtomicAndLeaveNoTempFiles(t *testing.T) {
	dir := t.TempDir()
	s, _ := openStore(dir)
	r := newTestRecord("bob")
	if err := s.create(r); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		s.update(r.ID, func(r *record) { r.Error = strings.Repeat("e", i*100) })
	}
	entries, _ := os.ReadDir(s.jobDir(r.ID))
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != "job.json" {
		t.Fatalf("job dir holds %v, want only job.json (the init creates the output)", names)
	}
	var onDisk record
	if err := readJSON(filepath.Join(s.jobDir(r.ID), recordFile), &onDisk); err != nil {
		t.Fatal(err)
	}
	if len(onDisk.Error) != 4900 {
		t.Fatalf("record on disk has %d bytes of error, want the last update's 4900", len(onDisk.Error))
	}
	fi, _ := os.Stat(filepath.Join(s.jobDir(r.ID), recordFile))
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("record mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestStoreReloadSkipsIncompleteJobs(t *testing.T) {
	dir := t.TempDir()
	s, _ := openStore(dir)
	r := newTestRecord("alice")
	s.create(r)
	// A creation cut short before its record, and a stray that is no ID.
	os.Mkdir(filepath.Join(dir, newID()), 0o700)
	os.Mkdir(filepath.Join(dir, "not-an-id"), 0o700)
	reloaded, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := reloaded.list(); len(got) != 1 || got[0].ID != r.ID {
		t.Fatalf("reloaded %v, want only %s", got, r.ID)
	}
}

func TestStoreNeverReusesAnID(t *testing.T) {
	s, _ := openStore(t.TempDir())
	r := newTestRecord("alice")
	if err := s.create(r); err != nil {
		t.Fatal(err)
	}
	if err := s.create(r); err == nil {
		t.Fatal("second create with the same ID succeeded")
	}
}

func TestListIsOldestFirst(t *testing.T) {
	s, _ := openStore(t.TempDir())
	base := time.Now().UTC()
	var want []string
	for i := 0; i < 5; i++ {
		r := newTestRecord("alice")
		r.CreatedAt = base.Add(time.Duration(5-i) * time.Second)
		s.create(r)
		want = append([]string{r.ID}, want...)
	}
	var got []string
	for _, r := range s.list() {
		got = append(got, r.ID)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("list order %v, want %v", got, want)
	}
}

func TestAPIJobHidesEnvironmentAndSupervision(t *testing.T) {
	r := newTestRecord("alice")
	r.Env = map[string]string{"TOKEN": "secret"}
	r.InitPID = 42
	data, _ := json.Marshal(r.Job)
	if strings.Contains(string(data), "secret") || strings.Contains(string(data), "init_pid") {
		t.Fatalf("API view leaks: %s", data)
	}
}

func TestIDs(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		id := newID()
		if !validID(id) || seen[id] {
			t.Fatalf("bad or repeated id %q", id)
		}
		seen[id] = true
	}
	for _, bad := range []string{"", "..", "../../etc/passwd", "ABCDEFGHIJKLMNOP", "abcdefghijklmno1", "abcdefghijklmnop/", "abcdefghijklmnopq"} {
		if validID(bad) {
			t.Errorf("validID(%q) = true", bad)
		}
	}
}

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true}, {"512", 512, true}, {"1K", 1024, true}, {"256M", 256 << 20, true}, {"1.5G", 3 << 29, true},
		{"2g", 2 << 30, true}, {"10MiB", 10 << 20, true}, {"1T", 1 << 40, true},
		{"", 0, false}, {"-1M", 0, false}, {"M", 0, false}, {"1X", 0, false}, {"NaN", 0, false}, {"Inf", 0, false},
		{"0x10", 0, false}, {"1e30G", 0, false}, {"1_000", 0, false},
	} {
		got, err := parseSize(c.in)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
	for _, n := range []int64{0, 1, 1023, 1024, 256 << 20, 3 << 29, 1 << 40} {
		back, err := parseSize(formatSize(n))
		if err != nil || (n%1024 == 0 && back != n) {
			t.Errorf("formatSize(%d) = %q reads back as %d, %v", n, formatSize(n), back, err)
		}
	}
}
